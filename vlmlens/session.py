"""The state of one lens session, split by job: what to record (:class:`Recording`) and the
:class:`Plan` built from it; which positions each forward and layer holds (:class:`Positions`,
written only by the lens's hooks); the read-only view interventions get (:class:`LensContext`);
and where a session resumes after a prefix (:class:`LensStart`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .run import span_mask

STORE_MODES = ("all", "image_text", "none")
HIDDEN_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ---- what to record, and the plan of a session -------------------------------------------------

@dataclass(frozen=True)
class Recording:
    """What a lens session records (the same settings as :func:`vlmlens.capture`'s keywords).

    store: "all" hidden states, "image_text" (no system tokens) or "none"; hidden_dtype:
    "float16" or "float32"; attention: image share and maps; contrib: the image tokens'
    contribution to each layer's attention output at the last prompt token.
    """

    store: str = "all"
    hidden_dtype: str = "float16"
    attention: bool = True
    contrib: bool = False
    vision: bool = False              # the vision tower's own per-layer states of the image patches

    def __post_init__(self):
        if self.store not in STORE_MODES:
            raise InputError(f"store must be one of {STORE_MODES}, got {self.store!r}")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise InputError(f"hidden_dtype must be one of {tuple(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}")
        object.__setattr__(self, "attention", bool(self.attention))
        object.__setattr__(self, "contrib", bool(self.contrib))
        object.__setattr__(self, "vision", bool(self.vision))

    def capture_kwargs(self) -> dict:
        """The keywords of :func:`vlmlens.capture` that ask for this recording."""
        return {"store": self.store, "hidden_dtype": self.hidden_dtype, "record_attention": self.attention,
                "record_contrib": self.contrib, "record_vision": self.vision}


#: record nothing (teacher-forced scoring, timing, gradients)
NOTHING = Recording(store="none", attention=False, contrib=False)


@dataclass(frozen=True, eq=False)
class Plan:
    """What one lens session records and which interventions apply. Make it with :meth:`build`.

    image_positions: sorted positions of the image tokens; n_layers: decoder layers L;
    n_prompt: prompt positions (generated tokens start there; the last prompt token,
    ``n_prompt - 1``, is where maps and contributions are read); store_positions: positions
    whose hidden states are kept (None: all).
    """

    image_positions: np.ndarray
    n_layers: int
    n_prompt: int
    recording: Recording = NOTHING
    interventions: tuple = ()
    store_positions: np.ndarray | None = None
    whole_forwards: bool = False      # every forward holds the whole sequence (no KV cache): decide anew each
    frames: int | None = None         # temporal slots of a video input (equal runs of the image positions)

    @classmethod
    def build(cls, image_positions, n_layers: int, n_prompt: int, recording: Recording = NOTHING,
              interventions=(), n_new: int = 0, whole_forwards: bool = False, frames: int | None = None) -> "Plan":
        """The plan of a session over a prompt of ``n_prompt`` positions (+ ``n_new`` generated).
        ``whole_forwards``: each forward runs the whole sequence from position 0 without a cache
        (generation with ``use_cache=False``), and the interventions decide afresh in each one
        (what interventions that decide at every step need); such a session records nothing."""
        img = np.asarray(image_positions, dtype=np.int64)
        store = None
        if recording.store == "image_text" and img.size:
            store = np.concatenate([img, np.arange(img[-1] + 1, int(n_prompt) + int(n_new) + 1)])
        if whole_forwards and recording != NOTHING:
            raise ValueError("a session of whole forwards records nothing (record one forward afterwards)")
        for iv in interventions:
            chosen = getattr(iv, "frames", None)
            if chosen is not None and (not frames or max(chosen) >= frames):
                raise InputError(f"{iv!r} names frames {list(chosen)}, but the input has "
                                 + (f"{frames} temporal slots (0..{frames - 1})" if frames else "no video"))
        return cls(img, int(n_layers), int(n_prompt), recording, tuple(interventions), store, bool(whole_forwards),
                   frames if frames else None)

    @property
    def map_from(self) -> int:
        return self.n_prompt - 1

    @property
    def record_hidden(self) -> bool:
        return self.recording.store != "none"

    @property
    def hidden_dtype(self) -> torch.dtype:
        return HIDDEN_DTYPES[self.recording.hidden_dtype]

    @property
    def record_attention(self) -> bool:
        return self.recording.attention

    @property
    def record_contrib(self) -> bool:
        return self.recording.contrib


# ---- positions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LensStart:
    """Where a session resumes after a prefix forward: positions seen, each layer's cache
    positions, layers that lost rows, the recordings of the prefix rows, and what the
    interventions decided there (their scratch space, e.g. a pruner's ranking)."""

    n_seen: int
    key_pos: dict
    pruned: frozenset
    hidden: dict
    share: dict
    scratch: dict = field(default_factory=dict)

    def without(self, positions: np.ndarray, from_layer: int) -> "LensStart":
        """The start after ``positions`` left layers >= ``from_layer`` (their rows and cache)."""
        gone = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        key_pos, hidden, pruned = dict(self.key_pos), dict(self.hidden), set(self.pruned)
        for l in [l for l in self.key_pos if l >= from_layer]:
            key_pos[l] = self.key_pos[l][~torch.isin(self.key_pos[l], gone.to(self.key_pos[l].device))]
            pruned.add(l)
            # hidden index l+1 is the output of decoder layer l: removed rows are not recorded there
            hidden[l + 1] = [(p[~np.isin(p, positions)], h[torch.as_tensor(~np.isin(p, positions))])
                             for p, h in self.hidden.get(l + 1, [])]
        return LensStart(self.n_seen, key_pos, frozenset(pruned), hidden, dict(self.share), self.scratch)


class ImageTable:
    """Which positions are image tokens, as a lookup table (asked for every layer's keys and
    queries at every step; a gather is much cheaper than torch.isin's sort). Negative
    positions (a batch's left padding) are never image tokens."""

    def __init__(self, image_positions: np.ndarray, device: torch.device):
        self.image_pos = torch.as_tensor(np.asarray(image_positions, dtype=np.int64), device=device)
        n = int(self.image_pos.max()) + 1 if self.image_pos.numel() else 0
        self._lut = torch.zeros(n + 1, dtype=torch.bool, device=device)
        if n:
            self._lut[self.image_pos] = True

    def is_image(self, pos: torch.Tensor) -> torch.Tensor:
        if self.image_pos.numel() == 0:
            return torch.zeros_like(pos, dtype=torch.bool)
        # the table's last entry is False: every position past the image maps there
        hit = self._lut[pos.clamp(0, self._lut.numel() - 1)]
        return hit & (pos >= 0) if int(self.image_pos[0]) == 0 else hit


@dataclass(frozen=True)
class BatchRow:
    """One example of a padded batch: ``positions[c]`` is the position (as a batch of one
    numbers it) of the example's token in column ``c`` of the prompt, -1 on padding; columns
    after the prompt (generated tokens) continue its numbering. Also its own image positions
    and prompt length."""

    positions: np.ndarray
    image_positions: np.ndarray
    n_prompt: int


class RowPositions:
    """One example's view of a batch's positions: the batch's columns mapped to the example's
    own positions. What interventions see of it is exactly what a batch of one shows them
    (padding columns are position -1: never an image token, never read)."""

    def __init__(self, shared: "Positions", row: BatchRow, device: torch.device):
        self._shared = shared
        self._table = ImageTable(row.image_positions, device)
        self.image_pos = self._table.image_pos
        self._lut = torch.as_tensor(np.asarray(row.positions, dtype=np.int64), device=device)
        self._shift = int(self._lut.numel()) - int(row.n_prompt)

    def of_columns(self, cols: torch.Tensor) -> torch.Tensor:
        P = self._lut.numel()
        return torch.where(cols < P, self._lut[cols.clamp(max=P - 1)], cols - self._shift)

    def is_image(self, pos: torch.Tensor) -> torch.Tensor:
        return self._table.is_image(pos)

    def rows(self, layer: int) -> torch.Tensor:
        return self.of_columns(self._shared.layer_qpos[layer])


class Positions:
    """Absolute positions of one lens session (in a batch: columns, shared by its examples;
    each example's own view is a :class:`RowPositions`).

    ``qpos``: positions of the current forward's rows; ``layer_qpos[l]``: those layer ``l``
    holds (fewer when rows were removed); ``key_pos[l]``: positions of the keys in layer
    ``l``'s cache; ``pruned``: layers that lost rows, where the model's own mask no longer
    describes the rows and the lens builds the mask from positions.
    """

    def __init__(self, image_positions: np.ndarray, device: torch.device):
        self._table = ImageTable(image_positions, device)
        self.image_pos = self._table.image_pos
        self.n_seen = 0
        self.qpos: torch.Tensor | None = None
        self.key_pos: dict[int, torch.Tensor] = {}
        self.layer_qpos: dict[int, torch.Tensor] = {}
        self.pruned: set[int] = set()
        self.pruned_now: dict[int, torch.Tensor] = {}   # this forward: layer -> bool over qpos of rows it holds
        self._memo: dict = {}     # this forward: what was derived from its tensors (see ``derived``)

    def is_image(self, pos: torch.Tensor) -> torch.Tensor:
        return self._table.is_image(pos)

    def rows(self, layer: int) -> torch.Tensor:
        """Positions of the rows decoder layer ``layer`` holds in the current forward."""
        return self.layer_qpos[layer]

    def restart(self) -> None:
        """Forget every earlier forward: the next one starts at position 0 with empty caches."""
        self.n_seen = 0
        self.key_pos, self.layer_qpos, self.pruned = {}, {}, set()
        self._memo = {}

    def begin_forward(self, q: int, device) -> torch.Tensor:
        self.qpos = torch.arange(self.n_seen, self.n_seen + q, device=device)
        self.pruned_now = {}
        self._memo = {}
        return self.qpos

    def derived(self, name: str, tensors: tuple, make):
        """``make()``, computed once per forward for these tensors (by identity: every layer of a
        forward that holds the same rows and keys shares them; the tensors are held until the
        next forward, so no other tensor can take their ids)."""
        key = (name, *(id(t) for t in tensors))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = (tensors, make())
        return hit[1]

    def enter_layer(self, layer: int, keep: torch.Tensor | None) -> torch.Tensor:
        """Layer ``layer`` takes this forward's rows (``keep``: the ones that stay); its cache
        gains their positions. Returns the positions of the layer's rows."""
        rows = self.qpos if keep is None else self.qpos[keep]
        if keep is not None:
            self.pruned.add(layer)
            self.pruned_now[layer] = keep
        else:
            self.pruned_now.pop(layer, None)
        self.layer_qpos[layer] = rows
        prev = self.key_pos.get(layer)
        # layers whose caches held the same positions hold the same ones again: one tensor for them
        self.key_pos[layer] = rows if prev is None else self.derived("keys", (prev, rows),
                                                                      lambda: torch.cat([prev, rows]))
        return rows

    def keys(self, layer: int, n_keys: int, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query positions, key positions) of ``layer`` for attention over ``n_keys`` keys."""
        qpos, kpos = self.layer_qpos[layer], self.key_pos[layer]
        if n_keys < kpos.numel():
            # a sliding-window cache keeps only the layer's most recent keys (in order): so do we
            kpos = self.key_pos[layer] = kpos[kpos.numel() - n_keys:]
        if kpos.numel() != n_keys or qpos.numel() != n_queries:
            raise RuntimeError(
                f"vlmlens lens lost track of positions at layer {layer}: {qpos.numel()} queries/{kpos.numel()} keys "
                f"recorded vs {n_queries}/{n_keys} in the model (a batch needs the lens's batch layout)")
        return qpos, kpos

    def end_forward(self) -> None:
        self.n_seen += int(self.qpos.numel())

    def resume(self, start: LensStart) -> None:
        self.n_seen = int(start.n_seen)
        self.key_pos = {l: p.clone() for l, p in start.key_pos.items()}
        self.pruned = set(start.pruned)


class LensContext:
    """What an intervention may read during a session (plus ``scratch``, its own space)."""

    def __init__(self, positions: "Positions | RowPositions", plan: Plan, n_prompt: int | None = None):
        self._positions = positions
        self.n_prompt = plan.n_prompt if n_prompt is None else int(n_prompt)
        self.n_layers = plan.n_layers
        self.n_vision_layers = 0                  # set by the lens: layers of the vision tower it hooks
        self.vision_feature_depth: int | None = None   # set by Lens.for_model: tower layers the features are read after
        self.attention_layers: frozenset | None = None  # set by the lens: layers with softmax attention (None: all)
        self.frames = plan.frames                 # temporal slots of a video input (None: an image)
        self.cross_layers: frozenset = frozenset()  # set by the lens: layers reading the image by cross-attention
        self.vision_modules: list = []            # set by the lens: the vision tower's layers (modules), read-only
        self.final_norm = None                    # set by Lens.for_model: the language model's final norm (read-only)
        self.scratch: dict[Any, Any] = {}

    @property
    def image_pos(self) -> torch.Tensor:
        return self._positions.image_pos

    def is_image(self, pos: torch.Tensor) -> torch.Tensor:
        return self._positions.is_image(pos)

    def frame_positions(self, frames) -> torch.Tensor:
        """Positions of the image (video) tokens of the temporal slots ``frames``: the slots are equal,
        consecutive runs of the image positions."""
        img = self.image_pos
        per = img.numel() // self.frames
        return torch.cat([img[f * per:(f + 1) * per] for f in sorted(frames)])

    def rows(self, layer: int) -> torch.Tensor:
        """Positions of the rows decoder layer ``layer`` holds in the current forward."""
        return self._positions.rows(layer)

    def span(self, name: str, pos: torch.Tensor) -> torch.Tensor:
        """Bool mask of ``pos`` in span ``name`` of the project's vocabulary (vlmlens.run.span_mask)."""
        img = self.image_pos
        first = int(img[0]) if img.numel() else 0
        last = int(img[-1]) if img.numel() else -1
        return span_mask(name, pos, is_image=self.is_image(pos), first_image=first, last_image=last,
                         n_prompt=self.n_prompt)
