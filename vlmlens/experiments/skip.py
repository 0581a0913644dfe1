"""Layer-skip scan (Skip-It): what happens when one decoder layer is skipped?

For each decoder layer l, ``SkipLayers([l], tokens)`` passes the ``tokens`` rows ("image":
only image tokens; "all": every token) through layer l unchanged; the output is compared with
the baseline (first-token KL, answer kept). Next to it: the adjacent-layer cosine distance of
the image tokens in the baseline, ``1 - cos(h_l, h_{l+1})`` averaged over image tokens (the
change layer l makes to them), from ``vlmlens.analysis.geometry.cosine_distance``. Layers
that barely turn the image states are the candidates for skipping.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..analysis.geometry import cosine_distance
from ..capture import capture
from ..errors import InputError, check_layer
from ..interventions import SkipLayers
from ..metrics import DEFAULT_SEPARATOR
from .engine import Progress, Trial, compare_outputs

SKIP_TOKENS = ("image", "all")


@dataclass
class SkipScanResult:
    model: str
    prompt: str
    n_layers: int
    layers: list[int]
    tokens: list[str]
    kl: dict            # tokens -> [per layer] first-token KL(baseline || skipped)
    answer_kept: dict   # tokens -> [per layer] bool
    text: dict          # tokens -> [per layer] generated text
    cosine_distance: list[float] | None   # [per layer] image tokens, 1 - cos(input, output) of layer l
    cosine_note: str
    baseline_text: str
    separator: str
    seconds: float = 0.0
    answer_kl: dict | None = None   # tokens -> [per layer] summed KL over the answer tokens (engine docstring)
    output_kl: dict | None = None   # tokens -> [per layer] summed KL over every generated token

    def to_json(self) -> dict:
        d = asdict(self)
        if d["cosine_distance"] is not None:
            d["cosine_distance"] = [None if not np.isfinite(x) else float(x) for x in d["cosine_distance"]]
        return d


def image_cosine_distance(run) -> np.ndarray:
    """[L] adjacent-layer cosine distance of the image tokens of ``run`` (needs hidden states)."""
    H = run.span_states("image")
    return np.asarray(cosine_distance(H), dtype=np.float64)


def layer_skip_scan(lm, image, prompt: str, *, tokens: Sequence[str] = SKIP_TOKENS, layers: Sequence[int] | None = None,
                    max_new_tokens: int = 16, separator: str = DEFAULT_SEPARATOR, reuse: bool = True,
                    progress: Progress | None = None) -> SkipScanResult:
    """Skip each layer in turn, for image tokens and/or all tokens (see the module docstring)."""
    L = lm.n_layers
    toks = [tokens] if isinstance(tokens, str) else list(tokens)
    for t in toks:
        if t not in SKIP_TOKENS:
            raise InputError(f"tokens must be among {SKIP_TOKENS}, got {t!r}")
    ls = list(range(L)) if layers is None else [check_layer("skip layer", l, 0, L - 1) for l in layers]
    t0 = time.perf_counter()
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens, reuse=reuse)
    kl = {t: [] for t in toks}
    akl = {t: [] for t in toks}
    okl = {t: [] for t in toks}
    kept = {t: [] for t in toks}
    text = {t: [] for t in toks}
    total = len(toks) * len(ls)
    for n, (t, l) in enumerate((t, l) for t in toks for l in ls):
        cmp = compare_outputs(s.baseline, s.evaluate([SkipLayers([l], tokens=t)]), separator,
                              getattr(lm.processor, "tokenizer", None))
        kl[t].append(cmp["first_token_kl"])
        akl[t].append(cmp["answer_kl"])
        okl[t].append(cmp["output_kl"])
        kept[t].append(cmp["answer_kept"])
        text[t].append(cmp["text"])
        if progress:
            progress(n + 1, total, f"skip layer {l} ({t})")
    geo = capture(lm, s.prep.visual, s.prep.prompt, max_new_tokens=0, store="image_text", hidden_dtype="float32",
                  record_attention=False)
    cos = image_cosine_distance(geo)
    note = "image tokens, prompt prefill; entry l = 1 - cos(input of layer l, output of layer l)"
    return SkipScanResult(lm.name, s.prep.prompt, L, ls, toks, kl, kept, text, [float(cos[l]) for l in ls], note,
                          s.baseline.run.generated_text, separator, round(time.perf_counter() - t0, 3), akl, okl)
