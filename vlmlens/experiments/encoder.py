"""Encoder depth x decoder depth: run the vision tower up to layer m and cut the image from
decoder layer k on, for every (m, k), and say which pairs keep the answer.

Each cell is ``[EncoderDepth(m), truncation(k, mode)]`` evaluated in one Trial against the
untouched baseline (m = the tower's feature depth F, k = L): the output, whether the answer is
kept, the KL summed over the baseline's output (teacher-forced), and -- with a ground truth --
whether it is correct. Row m = F is the decoder-only sweep; column k = L the encoder-only one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from ..metrics import DEFAULT_SEPARATOR
from .engine import Progress, Trial, check_mode
from .variants import parse_variants


@dataclass
class EncoderGrid:
    model: str
    prompt: str
    mode: str
    encoder_depths: list[int]        # m: vision-tower layers run
    decoder_depths: list[int]        # k: the image cut from decoder layer k on
    feature_depth: int               # F: where the model reads its features (m = F: the baseline tower)
    n_layers: int
    baseline_text: str
    truth: str | None
    text: list[list[str]]            # [m][k]
    kept: list[list[bool]]
    output_kl: list[list[float]]
    correct: list[list[bool]] | None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        from ..tables import Table

        def cell(i: int, j: int) -> str:
            c = "kept" if self.kept[i][j] else "lost"
            if self.correct is not None:
                c += " ✓" if self.correct[i][j] else " ✗"
            return c
        cols = [str(k) for k in self.decoder_depths]
        t = Table(["m", *cols], headers=["m \\ k", *cols])
        for i, m in enumerate(self.encoder_depths):
            t.add([f"{m}{' (F)' if m == self.feature_depth else ''}", *(cell(i, j) for j in range(len(cols)))])
        return t.markdown()


def encoder_decoder_grid(lm, image, prompt: str, *, encoder_depths=None, decoder_depths=None, mode: str = "remove",
                         max_new_tokens: int = 16, truth: str | None = None, separator: str = DEFAULT_SEPARATOR,
                         progress: Progress | None = None) -> EncoderGrid:
    """Every (m, k) pair (default: every m = 0..F and every k = 0..L)."""
    check_mode(mode)
    t0 = time.perf_counter()
    L = lm.n_layers
    F = lm.arch.vision_feature_depth(lm.model)
    plan = parse_variants(lm, depths=range(L + 1) if decoder_depths is None else decoder_depths, mode=mode,
                          encoder_depths=range(F + 1) if encoder_depths is None else encoder_depths)
    ms, ks = plan.encoder_depths, plan.depths
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens)
    variants = plan.variants
    cells = []
    for i, v in enumerate(variants):
        cells.append(s.cell(v.interventions, separator=separator, truth=truth)[0])
        if progress:
            progress(i + 1, len(variants), f"encoder {v.encoder_depth}, decoder {v.depth}")

    def grid(field, cast=lambda x: x):                       # m-major cells -> rows of m, columns of k
        return [[cast(c[field]) for c in cells[i * len(ks):(i + 1) * len(ks)]] for i in range(len(ms))]
    text, kept, kl, corr = grid("text"), grid("answer_kept", bool), grid("output_kl", float), grid("correct")
    return EncoderGrid(lm.name, s.prep.prompt, mode, ms, ks, F, L, s.baseline.run.generated_text, truth, text, kept, kl,
                       corr if truth is not None else None, round(time.perf_counter() - t0, 3))
