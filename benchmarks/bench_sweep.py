"""Truncation sweep with prefix reuse vs independent runs, side by side in one process.

(a) L+1 independent ``vl.capture`` runs, one per depth (``Truncate(k)``, k = 0..L);
(b) ``sweep(reuse=False)``: the same summary computed naively (baseline + one capture per depth
    + one teacher-forced full forward each, for the baseline answer's log-prob and the KL);
(c) ``sweep(reuse=True)``: one prefix forward over system + image tokens, then per depth the
    text tokens + decoding + scoring continue from that KV cache.

All three record what ``capture`` records by default (hidden states + attention statistics).
Target: (c) <= 0.6 x (a). Exactness: (c)'s tokens equal (a)'s, log-probs within 1e-5.
Times are the median (and minimum) of interleaved repeats.

    python benchmarks/bench_sweep.py                  # CPU, mid-size random LLaVA (12 x 768, 576 image tokens)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_capture import PRESETS, PROMPT, build, image  # noqa: E402


def run_independent(lm, n_new: int):
    import vlmlens as vl
    from vlmlens.interventions import Truncate

    return [vl.capture(lm, image(), PROMPT, max_new_tokens=n_new, interventions=[Truncate(k)])
            for k in range(lm.n_layers + 1)]


def run_sweep(lm, n_new: int, reuse: bool):
    from vlmlens.experiments.compare import sweep

    return sweep(lm, image(), PROMPT, max_new_tokens=n_new, reuse=reuse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = build(a.preset, "cpu", getattr(torch, a.dtype))
    L = lm.n_layers
    fns = {
        "independent": lambda: run_independent(lm, a.new_tokens),
        "naive_sweep": lambda: run_sweep(lm, a.new_tokens, False),
        "sweep": lambda: run_sweep(lm, a.new_tokens, True),
    }
    run_sweep(lm, 1, True)  # warm-up (allocator, kernels)
    times = {n: [] for n in fns}
    outs = {}
    for _ in range(a.repeats):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            outs[n] = fn()
            times[n].append(time.perf_counter() - t0)
            print(f"{n:12s} {times[n][-1]:8.2f} s", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    low = {n: min(v) for n, v in times.items()}
    indep, sw, naive = outs["independent"], outs["sweep"], outs["naive_sweep"]
    same = all(sw.runs[k].token_ids == indep[k].token_ids for k in range(L + 1))
    dlp = max(np.abs(np.array(sw.runs[k].token_logprobs) - indep[k].token_logprobs).max(initial=0) for k in range(L + 1))
    dkl = max(abs(x.first_token_kl - y.first_token_kl) for x, y in zip(sw.depths, naive.depths))
    dblp = max(abs(x.baseline_logprob - y.baseline_logprob) for x, y in zip(sw.depths, naive.depths))
    r_med, r_min = med["sweep"] / med["independent"], low["sweep"] / low["independent"]
    p = PRESETS[a.preset]
    label = {"independent": f"(a) {L + 1} independent captures (Truncate(k), k = 0..{L})",
             "naive_sweep": "(b) sweep(reuse=False): captures + teacher-forced full forwards",
             "sweep": "(c) sweep(reuse=True): prefix KV cache reused"}
    lines = [
        f"Model: random LLaVA, {p['layers']} layers x d_model {p['d']}, 576 image tokens, {a.new_tokens} new tokens,"
        f" cpu {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads (shared machine);"
        f" {a.repeats} interleaved repeats. All variants record hidden states + attention statistics.",
        "",
        "| variant | median (s) | min (s) |",
        "|---|---|---|",
    ]
    for n in fns:
        lines.append(f"| {label[n]} | {med[n]:.2f} | {low[n]:.2f} |")
    lines += [
        "",
        f"- time (c)/(a) = **{r_med:.3f}** median, {r_min:.3f} min (target <= 0.6:"
        f" {'met' if r_med <= 0.6 else 'NOT met'}); (c)/(b) = {med['sweep'] / med['naive_sweep']:.3f}",
        f"- exactness: tokens (c) == (a) at every depth: {'yes' if same else 'NO'}; max |log-prob (c) - (a)| = {dlp:.1e};"
        f" max |KL (c) - (b)| = {dkl:.1e}; max |baseline log-prob (c) - (b)| = {dblp:.1e}",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section(f"bench_sweep_{a.preset}_cpu", f"Truncation sweep with prefix reuse ({a.preset}, cpu)", text)


if __name__ == "__main__":
    main()
