"""Substitution matrix: does decoder layer j need *its own* image states, or would layer i's do?

For every pair i < j (on a grid of layers, ``stride`` apart), the image-token input of decoder
layer j is replaced by the image-token states of layer i (``Substitute(at_layer=j,
from_layer=i)``), and the output is compared with the baseline: first-token KL(baseline ||
substituted) and whether the answer is kept. The diagonal (i = j) is the identity and is
computed too, as a check (it must equal the baseline). Cells with i > j are empty (None).
Small KL below the diagonal means the image states barely change between i and j (the
redundancy that layer skipping exploits).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import InputError, check_layer
from ..interventions import Substitute
from ..metrics import DEFAULT_SEPARATOR
from .engine import Progress, Trial, compare_outputs


@dataclass
class SubstitutionResult:
    """Matrices indexed [row = at_layer j][col = from_layer i] over ``layers``."""

    model: str
    prompt: str
    n_layers: int
    layers: list[int]
    kl: list[list[float | None]]
    answer_kept: list[list[bool | None]]
    text: list[list[str | None]]
    baseline_text: str
    separator: str
    seconds: float = 0.0
    answer_kl: list[list[float | None]] | None = None   # summed KL over the answer tokens (engine docstring)
    output_kl: list[list[float | None]] | None = None   # summed KL over every generated token

    def to_json(self) -> dict:
        return asdict(self)


def substitution_layers(n_layers: int, stride: int = 1, layers: Sequence[int] | None = None) -> list[int]:
    """The layer grid: ``layers`` as given (validated), else 0, stride, 2*stride, ... plus L-1."""
    L = int(n_layers)
    if layers is not None:
        out = []
        for l in layers:
            out.append(check_layer("substitution layer", l, 0, L - 1))
        if not out:
            raise InputError(f"no substitution layers given; use integers in 0..{L - 1}")
        return sorted(set(out))
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise InputError(f"stride must be a positive integer, got {stride!r}")
    return sorted(set(range(0, L, stride)) | {L - 1})


def check_pair(at_layer: int, from_layer: int, n_layers: int) -> None:
    """A substitution pair must read from an earlier layer: 0 <= from_layer < at_layer <= L-1."""
    L = int(n_layers)
    for name, v in (("at_layer", at_layer), ("from_layer", from_layer)):
        check_layer(name, v, 0, L - 1)
    if from_layer >= at_layer:
        raise InputError(f"from_layer must be smaller than at_layer (0 <= from_layer < at_layer <= {L - 1});"
                         f" got from_layer={from_layer}, at_layer={at_layer}")


def substitution_matrix(lm, image, prompt: str, *, stride: int = 1, layers: Sequence[int] | None = None,
                        max_new_tokens: int = 16, separator: str = DEFAULT_SEPARATOR, reuse: bool = True,
                        progress: Progress | None = None) -> SubstitutionResult:
    """The full i <= j grid (see the module docstring); ``stride`` thins it for deep models."""
    import time

    grid = substitution_layers(lm.n_layers, stride, layers)
    t0 = time.perf_counter()
    s = Trial(lm, image, prompt, max_new_tokens=max_new_tokens, reuse=reuse)
    n = len(grid)
    kl = [[None] * n for _ in range(n)]
    akl = [[None] * n for _ in range(n)]
    okl = [[None] * n for _ in range(n)]
    kept = [[None] * n for _ in range(n)]
    text = [[None] * n for _ in range(n)]
    total, done = n * (n + 1) // 2, 0
    for r, j in enumerate(grid):
        for c, i in enumerate(grid[: r + 1]):
            cmp = compare_outputs(s.baseline, s.evaluate([Substitute(at_layer=j, from_layer=i)]), separator,
                                  getattr(lm.processor, "tokenizer", None))
            kl[r][c], kept[r][c], text[r][c] = cmp["first_token_kl"], cmp["answer_kept"], cmp["text"]
            akl[r][c], okl[r][c] = cmp["answer_kl"], cmp["output_kl"]
            done += 1
            if progress:
                progress(done, total, f"substitute {i} -> {j}")
    return SubstitutionResult(lm.name, s.prep.prompt, lm.n_layers, grid, kl, kept, text,
                              s.baseline.run.generated_text, separator, round(time.perf_counter() - t0, 3), akl, okl)
