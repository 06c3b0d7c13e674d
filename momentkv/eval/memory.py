"""What an evaluation pass stored: each layer's KV slots after the last step, checked against the policy's budget.

Fidelity at a budget only means something if the cache really held that budget, so every pass reads the
cache's own stats and fails loudly when a layer holds more than its policy allows: generated tokens beyond
``budget + cadence - 1`` (prompt-intact policies), or slots beyond ``budget + cadence - 1`` in all
(``scope: all``, where the budget counts the prompt too). Layers that keep everything (no decode policy,
``uncompressed_layers``, or a ratio budget without cap) have no bound. Slots are per batch row and KV head;
in a left-padded batch a prompt-intact layer's slots include the padding of shorter rows.
"""

from __future__ import annotations

from dataclasses import dataclass


class StoredTokensError(RuntimeError):
    """A cache layer held more tokens than its policy's budget allows (an engine defect, never user input)."""


@dataclass(frozen=True)
class StoredTokens:
    """Slots held after the last step, from the cache's ``stats()``."""

    slots: float  # mean over layers of the slots each layer holds (prompt + generated)
    generated: float  # mean over layers of the slots holding generated tokens
    max_slots: int  # the largest layer
    peak: int  # the most slots any layer held at any time


def layer_limit(layer: dict, cadence: int) -> int | None:
    """The most slots ``layer`` (one entry of ``stats()['layers']``) may hold in the part its budget counts."""
    budget = layer.get("budget")
    return None if budget is None else budget + cadence - 1


def check_stored(stats: dict, policy, label: str) -> StoredTokens:
    """Read the stored slots of a finished pass from the cache's ``stats`` and check them against ``policy``.

    Raises :class:`StoredTokensError` naming the layer that holds more than ``policy`` allows.
    """
    layers = stats["layers"]
    decode = getattr(policy, "decode", None)
    if decode is not None:
        for layer in layers:
            limit = layer_limit(layer, decode.cadence)
            if limit is None:
                continue
            held = layer["stored"] if decode.scope == "all" else layer["generated_stored"]
            if held > limit:
                what = "slots" if decode.scope == "all" else "generated tokens"
                raise StoredTokensError(f"{label}: layer {layer['layer']} holds {held} {what}, more than its budget "
                                        f"allows ({limit})")
    n = max(len(layers), 1)
    return StoredTokens(slots=sum(x["stored"] for x in layers) / n,
                        generated=sum(x["generated_stored"] for x in layers) / n,
                        max_slots=max((x["stored"] for x in layers), default=0),
                        peak=max((x.get("peak", x["stored"]) for x in layers), default=0))
