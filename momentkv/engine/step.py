"""The record a cache layer's ``update`` leaves for the attention function of the same layer and forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from momentkv.engine.layer import EvictingLayer

STEP_KWARG = "momentkv_step"  # the key under which ``update`` puts the record into the attention kwargs


@dataclass
class StepRecord:
    """What ``update`` decided about this forward of one layer.

    The attention module passes the same ``kwargs`` dict to ``cache.update`` and then unpacks it into the
    attention function, so the record travels from one to the other under :data:`STEP_KWARG`.

    Attributes:
        layer: the cache layer; the attention function asks it for the mask (:meth:`EvictingLayer.step_mask`)
            and hands it the step (:meth:`EvictingLayer.observe`), nothing else.
        context: the tokens fed are context (a prompt or a later user turn), not a generated token.
        needs_attention: a decode step whose scorers read the attention of its query: the attention function
            computes it with the output (decided here, once, from the layer's plan).
        chunk: ``(first slot, length)`` of a context chunk whose padding the model's mask will tell.
    """

    layer: "EvictingLayer"
    context: bool
    needs_attention: bool = False
    chunk: tuple[int, int] | None = None
