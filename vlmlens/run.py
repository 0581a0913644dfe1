"""Run: one captured forward + generation, and its on-disk format.

A run directory holds exactly three files:

* ``run.json``            metadata, tokens, spans, generated text, log-probs (JSON)
* ``arrays.safetensors``  every named array (safetensors: no pickle, no code)
* ``image.png``           the input image as the model saw it before processing

Axis names used everywhere: ``layer, head, pos, d_model``. ``layer`` 0 is the embedding
output (the input of decoder layer 0); layer ``l`` (1..L) is the output of decoder layer
``l-1``, i.e. the raw residual stream before the final norm.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

FORMAT_VERSION = 1
RUN_FILES = ("run.json", "arrays.safetensors", "image.png")
SPAN_NAMES = ("system", "image", "text", "generated")
#: every span name of the project, one definition (``span_mask``) for numpy and torch positions
SPAN_VOCABULARY = {
    "system": "before the first image token",
    "image": "the image tokens",
    "text": "after the last image token, to the end of the prompt",
    "generated": "the generated tokens",
    "last": "the last prompt token (it predicts the first answer token)",
    "prompt": "every prompt position",
    "all": "every position",
    "non_image": "every position that is not an image token",
    "reads_image": "every non-image position after the first image token (the queries that can see the image)",
}


def span_mask(name: str, pos, *, is_image, first_image: int, last_image: int, n_prompt: int):
    """Boolean mask of the positions ``pos`` (numpy array or torch tensor) in span ``name``
    (see :data:`SPAN_VOCABULARY`); ``is_image`` is the image mask of ``pos``. Without image
    tokens pass ``first_image = last_image + 1 = 0``. Tokens between two image blocks (tile
    separators) belong to no span but ``prompt`` / ``all`` / ``non_image`` / ``reads_image``."""
    if name == "image":
        return is_image
    if name == "system":
        return pos < first_image
    if name == "text":
        return (pos > last_image) & (pos < n_prompt)
    if name == "generated":
        return pos >= n_prompt
    if name == "last":
        return pos == n_prompt - 1
    if name == "prompt":
        return pos < n_prompt
    if name == "all":
        return pos >= 0
    if name == "non_image":
        return ~is_image
    if name == "reads_image":
        return ~is_image & (pos > first_image)
    raise KeyError(f"unknown span {name!r}; expected one of {tuple(SPAN_VOCABULARY)}")


class RunFormatError(ValueError):
    """A run directory or Run object is malformed."""


def _slices_of(positions: np.ndarray) -> list[slice]:
    """Contiguous runs of sorted integer positions, as slices."""
    out: list[slice] = []
    if len(positions) == 0:
        return out
    start = prev = int(positions[0])
    for p in positions[1:]:
        p = int(p)
        if p != prev + 1:
            out.append(slice(start, prev + 1))
            start = p
        prev = p
    out.append(slice(start, prev + 1))
    return out


@dataclass(frozen=True)
class TokenSpans:
    """Which positions of a run belong to which part of the sequence.

    ``image_positions`` lists every image-token position (sorted). The other spans are
    contiguous ranges: ``system`` = before the first image token, ``text`` = after the
    last image token up to the end of the prompt, ``generated`` = the generated tokens.
    Tokens between two image blocks (tile separators) belong to no span.
    """

    n_prompt: int
    n_total: int
    image_positions: tuple[int, ...]

    @property
    def image(self) -> slice | list[slice]:
        """Image-token positions: one slice if contiguous, else a list of slices."""
        parts = _slices_of(np.asarray(self.image_positions, dtype=np.int64))
        if not parts:
            return slice(0, 0)
        return parts[0] if len(parts) == 1 else parts

    @property
    def system(self) -> slice:
        first = self.image_positions[0] if self.image_positions else 0
        return slice(0, first)

    @property
    def text(self) -> slice:
        start = self.image_positions[-1] + 1 if self.image_positions else 0
        return slice(start, self.n_prompt)

    @property
    def generated(self) -> slice:
        return slice(self.n_prompt, self.n_total)

    @property
    def n_image(self) -> int:
        return len(self.image_positions)

    def positions(self, name: str) -> np.ndarray:
        """Integer positions of span ``name`` (any name of :data:`SPAN_VOCABULARY`)."""
        if name == "image":
            return np.asarray(self.image_positions, dtype=np.int64)
        pos = np.arange(self.n_total)
        img = np.zeros(self.n_total, dtype=bool)
        img[np.asarray(self.image_positions, dtype=np.int64)] = True
        first = self.image_positions[0] if self.image_positions else 0
        last = self.image_positions[-1] if self.image_positions else -1
        return pos[span_mask(name, pos, is_image=img, first_image=first, last_image=last, n_prompt=self.n_prompt)]

    def label_of(self, pos: int) -> str:
        """The span name of one position ('other' for separators between image blocks)."""
        for name in SPAN_NAMES:
            if pos in set(self.positions(name).tolist()):
                return name
        return "other"

    def to_json(self) -> dict:
        return {"n_prompt": self.n_prompt, "n_total": self.n_total, "image_positions": list(self.image_positions)}

    @classmethod
    def from_json(cls, d: dict) -> "TokenSpans":
        try:
            spans = cls(int(d["n_prompt"]), int(d["n_total"]), tuple(int(p) for p in d["image_positions"]))
        except (KeyError, TypeError, ValueError) as e:
            raise RunFormatError(f"run.json: malformed 'spans' entry ({e})") from None
        if not (0 <= spans.n_prompt <= spans.n_total):
            raise RunFormatError("run.json: spans must satisfy 0 <= n_prompt <= n_total")
        if any(not (0 <= p < spans.n_prompt) for p in spans.image_positions):
            raise RunFormatError("run.json: image positions must lie inside the prompt")
        if list(spans.image_positions) != sorted(set(spans.image_positions)):
            raise RunFormatError("run.json: image positions must be sorted and unique")
        return spans


@dataclass
class Run:
    """One captured forward + generation.

    Attributes:
        meta: model name, family, prompt, image sha256, generation settings, interventions,
            vlmlens version, n_layers, n_heads, d_model, dtype of the stored states.
        tokens: token strings of the whole sequence (prompt + generated).
        token_ids: token ids, same length as ``tokens``.
        spans: TokenSpans of the sequence.
        image_grid: (rows, cols) of the drawable image patch grid; ``grid_index`` (the
            array ``image_grid_index``) names the image token in each cell, and
            ``to_grid(values)`` turns per-image-token values into a heatmap. For a plain
            raster (LLaVA, Qwen2-VL) token i sits at ``divmod(i, cols)``; ``meta["grid_order"]``
            says how tiled families are laid out.
        generated_text: decoded generated tokens (without the stop token).
        token_logprobs: log-probability of each generated token [n_generated].
        image: the input image (RGB).
        arrays: named arrays, at least
            ``hidden_states`` [layer, pos, d_model] (L+1 layers; may be absent with store="none"),
            ``attention_to_image`` [layer, head, pos]: attention mass each query puts on the
            image keys; NaN for image-token queries (not recorded),
            ``attention_maps`` [layer, query, n_image]: head-averaged attention over image keys
            of the queries at ``map_positions`` (last prompt token, then each generated token),
            ``map_positions`` [query]: the positions of those queries,
            ``hidden_positions`` [pos]: which sequence positions ``hidden_states`` holds.
    """

    meta: dict
    tokens: list[str]
    token_ids: list[int]
    spans: TokenSpans
    image_grid: tuple[int, int]
    generated_text: str
    token_logprobs: list[float]
    image: Image.Image
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    # ---- convenient views -------------------------------------------------------------
    @property
    def hidden_states(self) -> np.ndarray:
        """[layer, pos, d_model] residual stream; layer 0 = embeddings."""
        if "hidden_states" not in self.arrays:
            raise KeyError("this run stored no hidden states (captured with store='none')")
        return self.arrays["hidden_states"]

    @property
    def attention_to_image(self) -> np.ndarray:
        """[layer, head, pos] attention mass on image keys (NaN for image-token queries)."""
        return self.arrays["attention_to_image"]

    @property
    def attention_maps(self) -> np.ndarray:
        """[layer, query, n_image] head-averaged attention over image patches."""
        return self.arrays["attention_maps"]

    @property
    def attention_head_maps(self) -> np.ndarray:
        """[layer, head, n_image]: each head's attention over the image keys, last prompt token."""
        return self.arrays["attention_head_maps"]

    @property
    def attention_first_token(self) -> np.ndarray | None:
        """[layer, head]: the last prompt token's attention on position 0 (the first token, where
        pretrained LMs park attention: the "sink"); None in runs recorded before it existed."""
        return self.arrays.get("attention_first_token")

    @property
    def map_positions(self) -> np.ndarray:
        return self.arrays["map_positions"]

    @property
    def hidden_positions(self) -> np.ndarray:
        if "hidden_positions" in self.arrays:
            return self.arrays["hidden_positions"]
        return np.arange(self.spans.n_total)

    @property
    def grid_index(self) -> np.ndarray:
        """[rows, cols] image-token index drawn in each grid cell (-1: no token there)."""
        if "image_grid_index" in self.arrays:
            return self.arrays["image_grid_index"]
        rows, cols = self.image_grid
        return np.arange(rows * cols).reshape(rows, cols)

    def to_grid(self, values) -> np.ndarray:
        """Per-image-token values [..., n_image] -> [..., rows, cols] (NaN where no token)."""
        v = np.asarray(values, dtype=np.float32)
        if v.shape[-1] != self.spans.n_image:
            raise ValueError(f"expected {self.spans.n_image} values per image token, got {v.shape[-1]}")
        idx = self.grid_index
        out = v[..., np.maximum(idx, 0)]
        out[..., idx < 0] = np.nan
        return out

    @property
    def n_layers(self) -> int:
        """Number of decoder layers L (hidden states have L+1 entries)."""
        return int(self.meta["n_layers"])

    @property
    def prompt(self) -> str:
        return str(self.meta.get("prompt", ""))

    @property
    def generated_tokens(self) -> list[str]:
        return self.tokens[self.spans.n_prompt:]

    def span_states(self, span: str) -> np.ndarray:
        """Hidden states of one span: [layer, n_tokens, d_model] (float32)."""
        want = self.spans.positions(span)
        have = self.hidden_positions
        idx = np.searchsorted(have, want)
        ok = (idx < len(have)) & (have[np.minimum(idx, len(have) - 1)] == want)
        return self.hidden_states[:, idx[ok], :].astype(np.float32)

    def summary(self) -> str:
        s = self.spans
        lines = [
            f"model:      {self.meta.get('model')} ({self.meta.get('family')}, {self.n_layers} layers)",
            f"tokens:     {s.n_total} = system {s.system.stop - s.system.start} + image {s.n_image}"
            f" ({self.image_grid[0]}x{self.image_grid[1]} grid) + text {s.text.stop - s.text.start}"
            f" + generated {s.n_total - s.n_prompt}",
            f"generated:  {self.generated_text!r}",
        ]
        if self.meta.get("interventions"):
            lines.append(f"interventions: {self.meta['interventions']}")
        return "\n".join(lines)
