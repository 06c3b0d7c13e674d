"""Where a forward pass is, seen from outside the engine: momentkv's ``update``, the attention function,
the scorers' ``observe``, or the rest of the model.

The engine carries no instrumentation. :func:`watch_layers` wraps the ``update`` and ``observe`` methods of
*one cache's layers* (instance attributes: no class changes, nothing global) so that a :class:`Regions`
tracker hears every boundary. Per layer and forward, the attention module calls the cache's ``update``, then
the attention function, which calls the layer's ``observe`` as its last act; so the span from ``update``
returning to ``observe`` being called is the attention function itself (the layer's mask, then SDPA or the
single pass that also gives the scores). A span that no ``observe`` closes (a cache whose attention function
does not report, such as transformers' own ``DynamicCache``) counts as the model's.
"""

from __future__ import annotations

from functools import wraps

UPDATE, ATTENTION, OBSERVE, MODEL = "update", "attention", "observe", "model"
MOMENTKV_REGIONS = (UPDATE, ATTENTION, OBSERVE)


class Regions:
    """Tracks the current region. Subclasses account for what happens inside one in :meth:`close`."""

    def __init__(self) -> None:
        self.current = MODEL

    def enter(self, region: str) -> None:
        """Leave the current region for ``region``; an attention span not closed by ``observe`` is the model's."""
        if self.current == ATTENTION and region != OBSERVE:
            self.close(MODEL)
        else:
            self.close(self.current)
        self.current = region

    def close(self, region: str) -> None:
        """Account what happened since the last boundary to ``region``."""
        raise NotImplementedError


def _entering(method, regions: Regions, region: str, after: str):
    @wraps(method)
    def wrapper(*args, **kwargs):
        regions.enter(region)
        try:
            return method(*args, **kwargs)
        finally:
            regions.enter(after)

    return wrapper


def watch_layers(cache, regions: Regions) -> None:
    """Report every layer's ``update`` and ``observe`` (where it has one) of ``cache`` to ``regions``."""
    for layer in cache.layers:
        layer.update = _entering(layer.update, regions, UPDATE, ATTENTION)
        if hasattr(layer, "observe"):
            layer.observe = _entering(layer.observe, regions, OBSERVE, MODEL)
