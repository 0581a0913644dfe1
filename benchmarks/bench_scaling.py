"""How capture scales with the number of image tokens, next to plain SDPA and eager attention.

Random LLaVA (preset ``mid``: 12 layers x d_model 768) whose CLIP tower sees 14*side pixels,
so the language model reads side*side image tokens (576, 1156, 2304, 4624 by default). For
each size and each variant — (a) plain SDPA ``generate``, (b) ``vl.capture``, (c) eager with
``output_attentions=True, output_hidden_states=True`` — a fresh subprocess builds the model,
warms up with one plain token, then times one run and reads its peak RSS above the RSS the
built model had before the warm-up (CUDA: ``max_memory_allocated`` above the allocation after it). Variants of one size run back to back; a variant killed for
memory is reported as such.

    python benchmarks/bench_scaling.py                          # CPU, 4 new tokens
    python benchmarks/bench_scaling.py --device cuda --dtype bfloat16 --sides 24,34,48,68,96
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._children import add_child_args, run_child  # noqa: E402
from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_capture import PRESETS, _rss, _sync, build, variant  # noqa: E402

NAMES = ("plain", "capture", "eager")
LABEL = {"plain": "(a) plain SDPA", "capture": "(b) vl.capture", "eager": "(c) eager + outputs"}


def child(preset: str, device: str, dtype_name: str, side: int, name: str, n_new: int) -> None:
    dev = torch.device(device)
    lm = build(preset, device, getattr(torch, dtype_name), side)
    # the baseline is taken before the warm-up: a one-token plain generate at this size peaks
    # below every variant (each prefills the same tokens and does more), so the process's
    # high-water mark above the baseline is the variant's own peak
    before = _rss() if dev.type != "cuda" else 0
    variant(lm, "plain", 1, side)                     # warm-up at this size
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    kept = variant(lm, name, n_new, side)
    _sync(dev)
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"seconds": seconds, "peak": int(peak), "kept": int(kept)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_child_args(ap, PRESETS, new_tokens=4)
    ap.add_argument("--sides", default="24,34,48,68", help="patches per side (image tokens = side^2)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        child(a.preset, a.device, a.dtype, int(a.child[0]), a.child[1], a.new_tokens)
        return 0
    sides = [int(s) for s in a.sides.split(",")]
    res: dict = {}
    for side in sides:
        for name in NAMES:
            res[(side, name)] = run_child(__file__, a, str(side), name)
            print(side * side, name, res[(side, name)], flush=True)
    mib = lambda b: b / 2**20  # noqa: E731
    p = PRESETS[a.preset]
    lines = [f"Random LLaVA {p['layers']} x {p['d']} ({a.preset}), {a.new_tokens} new tokens, {a.device} {a.dtype}, "
             f"torch {torch.__version__}, {a.threads} threads; one timed run per cell after a warm-up, each in a fresh "
             "process.", "",
             "| image tokens | " + " | ".join(f"{LABEL[n]} s" for n in NAMES) + " | "
             + " | ".join(f"{LABEL[n]} peak MiB" for n in NAMES) + " | arrays kept by (b) MiB | (b)/(a) time | "
             "(b) peak / (1.1 (a) + kept) | (c)/(b) peak |",
             "|---" * 11 + "|"]
    for side in sides:
        r = {n: res[(side, n)] for n in NAMES}
        t = [f"{r[n]['seconds']:.2f}" if "seconds" in r[n] else r[n]["error"][:30] for n in NAMES]
        m = [f"{mib(r[n]['peak']):.0f}" if "peak" in r[n] else "—" for n in NAMES]
        ok = all("peak" in r[n] for n in ("plain", "capture"))
        kept = mib(r["capture"]["kept"]) if ok else float("nan")
        ratio_t = r["capture"]["seconds"] / r["plain"]["seconds"] if ok else float("nan")
        budget = (r["capture"]["peak"] / (1.1 * r["plain"]["peak"] + r["capture"]["kept"])) if ok else float("nan")
        ce = (r["eager"]["peak"] / max(1, r["capture"]["peak"])) if ok and "peak" in r["eager"] else float("nan")
        lines.append(f"| {side * side} | " + " | ".join(t) + " | " + " | ".join(m)
                     + f" | {kept:.1f} | {ratio_t:.2f} | {budget:.2f} | {ce:.1f} |")
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        write_section(f"bench_scaling_{a.preset}_{torch.device(a.device).type}",
                      f"Scaling with image tokens ({a.preset}, {torch.device(a.device).type})", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
