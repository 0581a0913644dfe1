"""What every intervention shares: the meaning methods (prefix effect, gradient-safe form,
conflicts, image-row edits) with their defaults, and the functions that ask them."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import InputError


@dataclass(frozen=True)
class PrefixEffect:
    """What an intervention does to a prompt's prefix (every position up to the last image token).

    kind: "unchanged" (the baseline's prefix holds), "cut_image" (the baseline's prefix with the
    image positions taken out of layers >= ``from_layer``), "recompute" (run the prefix under the
    intervention), "independent" (the intervention needs the whole prompt, e.g. a ranking read at
    the last prompt token: no prefix can be shared).
    """

    kind: str
    from_layer: int | None = None


UNCHANGED = PrefixEffect("unchanged")
RECOMPUTE = PrefixEffect("recompute")
INDEPENDENT = PrefixEffect("independent")


def cross_attention_refusal(iv, cross_layers=()) -> str | None:
    """Why ``iv`` has no meaning on a model that reads the image by cross-attention in ``cross_layers``
    (None: it has one, its ``cross_attention`` says what it does there). Interventions that do not say
    are refused."""
    where = getattr(iv, "layers", None)
    if getattr(iv, "dst", None) == "image" and where and not set(where) & set(cross_layers):
        return f"layers {list(where)} hold no cross-attention, so nothing there reads the image"
    said = getattr(iv, "cross_attention", None)
    if isinstance(said, str) and said.startswith("refused:"):
        return said[len("refused:"):].strip()
    return None if said else "it acts on image tokens in the sequence, which a cross-attention model has none of"


def refuse_for_structure(interventions: Sequence, *, cross_layers=(), injections: bool = False) -> None:
    """Refuse (InputError, with the reason) what the model's structure gives no meaning: on a cross-attention
    model (``cross_layers``) every intervention whose ``cross_attention`` does not say what it does there; on
    a model that adds vision features between layers (``injections``: DeepStack) a cut of chosen frames."""
    for iv in interventions:
        if getattr(iv, "transforms_input", False):
            raise InputError(f"{iv!r} changes the input image itself, which the lens never sees: it runs as a method"
                             " of a pruning comparison or study (compare_pruning, prune/study --methods)")
        why = cross_attention_refusal(iv, cross_layers) if cross_layers else None
        if why:
            raise InputError(f"{iv!r}: {why}; this model reads the image only through its cross-attention layers "
                             f"{sorted(cross_layers)} (image tokens never enter the self-attention stream)")
        if injections and getattr(iv, "frames", None) is not None:
            raise InputError("a cut of chosen video frames is not available on a model that adds vision features "
                             "between its layers (DeepStack): the lens stops them for the whole video or not at all; cut"
                             " the whole video (Truncate without frames)")


class _Base:
    #: what it does on a cross-attention model (Mllama): a description, or "refused: <why>" (None: refused)
    cross_attention: str | None = None
    #: at most one intervention of each exclusive group per run (None: no limit)
    exclusive: str | None = None
    exclusive_hint: str = ""

    def to_json(self) -> dict:
        return {"kind": type(self).__name__, **asdict(self)}

    def validate(self, n_layers: int) -> None:  # overridden
        pass

    def prefix_effect(self, n_layers: int) -> PrefixEffect:
        return RECOMPUTE

    def gradient_safe(self):
        return self

    def image_row_edits(self, n_layers: int) -> set:
        return set()

    def batch_conflict(self) -> str | None:
        """Why this intervention cannot run in a left-padded batch (None: it can). Reading
        attention or MLP inputs, or taking rows out of the sequence, is per example."""
        return _batch_conflict(self)

    def conflicts(self, others: Sequence, n_layers: int) -> str | None:
        if self.exclusive and any(getattr(o, "exclusive", None) == self.exclusive for o in others):
            return f"conflicting interventions: more than one {self.exclusive}{self.exclusive_hint}"
        return None


def removal_conflict(who: str, k: int, others: Sequence, n_layers: int) -> str | None:
    """Why ``others`` cannot run with an intervention that takes image rows out of layers >= k."""
    for iv in others:
        edits = getattr(iv, "image_row_edits", None)
        if edits is not None and any(l >= k for l in edits(n_layers)):
            return (f"conflicting interventions: {who} takes the image tokens out of layers >= {k}, so {iv!r} cannot"
                    " act on them there")
    return None


_PER_EXAMPLE = (("observe_attention", "reads attention to rank tokens"), ("read_mlp_input", "reads MLP inputs"),
                ("removed_positions", "takes rows out of the sequence"),
                ("observe_input", "reads the language model's input rows to choose tokens"))


def _batch_conflict(iv) -> str | None:
    for name, why in _PER_EXAMPLE:
        if getattr(iv, name, None) is not None:
            return f"{iv!r} {why}, which is per example"
    return None


def batch_conflict(interventions: Sequence) -> str | None:
    """Why ``interventions`` cannot run batched (the first reason), or None. Interventions that
    do not say (user-written ones) are judged by the lens hooks they implement."""
    for iv in interventions:
        ask = getattr(iv, "batch_conflict", None)
        why = ask() if ask is not None else _batch_conflict(iv)
        if why:
            return why
    return None


def validate_all(interventions: Sequence, n_layers: int) -> None:
    """Validate each intervention and reject combinations that contradict each other (each
    intervention's own ``conflicts`` says why; user-written ones may have neither method)."""
    interventions = list(interventions)
    for iv in interventions:
        check = getattr(iv, "validate", None)
        if check is not None:
            check(n_layers)
    for i, iv in enumerate(interventions):
        conflicts = getattr(iv, "conflicts", None)
        msg = conflicts(interventions[:i] + interventions[i + 1:], n_layers) if conflicts is not None else None
        if msg:
            raise InputError(msg)


def decides_every_step(interventions: Sequence) -> bool:
    """Whether an intervention decides anew at every generation step (``every_step``): then each
    step is one full forward without a KV cache (what it decided before cannot be reused)."""
    return any(bool(getattr(iv, "every_step", False)) for iv in interventions)


def prefix_effect(iv, n_layers: int) -> PrefixEffect:
    """``iv.prefix_effect(n_layers)``; an intervention without the method is recomputed."""
    fn = getattr(iv, "prefix_effect", None)
    return fn(n_layers) if fn is not None else RECOMPUTE


def gradient_safe(iv):
    """``iv.gradient_safe()``; an intervention without the method is used as it is."""
    fn = getattr(iv, "gradient_safe", None)
    return fn() if fn is not None else iv
