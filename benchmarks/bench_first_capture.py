"""The first capture after the model is loaded, next to the ones after it (tiny-shapes, the default model).

A first capture pays for what runs once per process (lazy imports inside the lens and the analysis, torch's
first calls on each op, the processor's first image). Each repeat is a fresh interpreter: load the model
(timed apart), then the same capture ``--captures`` times; the ratio first / median of the later ones is
what a script's first capture costs over a later one. The dashboard's Run button is timed the same way
(its server call: capture + what the Overview shows), with a pause
after each Run for the views it draws in the background (a reader reads between Runs). Target: at most 3x.
Python may keep its bytecode caches, as an installed package does (a ``PYTHONDONTWRITEBYTECODE`` in the
environment is lifted for the interpreters timed here: with it every fresh interpreter compiles vlmlens's
sources again, ~30 ms of a tiny-shapes first capture that no installed copy pays).

    python benchmarks/bench_first_capture.py             # writes its section of BENCHMARKS.md
    python benchmarks/bench_first_capture.py --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, time
t0 = time.perf_counter()
import vlmlens as vl
lm = vl.load_model("tiny-shapes", device="cpu", dtype="float32")
load = time.perf_counter() - t0
times = []
for _ in range({n}):
    t = time.perf_counter()
    vl.capture(lm, vl.EXAMPLES / "shapes_00.png", "What color is the circle?", max_new_tokens=8)
    times.append(time.perf_counter() - t)
print(json.dumps({{"load": load, "captures": times}}))
"""


DASH = """
import json, time
from vlmlens.ui.callbacks import Dashboard, new_session
from vlmlens.ui.inputs import EXAMPLES_DIR
d = Dashboard(model="tiny-shapes", runs_dir=None)
d.holder.wait(300)
time.sleep(3)
sess = new_session()
for _ in range({n}):
    d.capture(str(EXAMPLES_DIR / "shapes_00.png"), "What color is the circle?", 8, sess, progress=lambda *a, **k: None)
    time.sleep(4)
print(json.dumps({{"load": d.holder.load_seconds, "captures": list(d.timings["capture"])}}))
"""


def one(n: int, child: str = CHILD) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run([sys.executable, "-c", child.format(n=n)], capture_output=True, text=True, cwd=ROOT,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh interpreters")
    ap.add_argument("--captures", type=int, default=5, help="captures per interpreter")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    lines = [f"tiny-shapes, cpu float32, 8 new tokens, the example scene; {a.repeats} fresh interpreters x "
             f"{a.captures} captures each (model load timed apart; bytecode caches kept, as installed). "
             "`load_model` makes the processor's first call (chat template compiled, tokenizer and image processor "
             "warmed: one small grey image, no forward) and `vl.load_model` brings the capture modules in.", ""]
    for what, child in (("script: `vl.capture`", CHILD), ("dashboard: the Run button's server call", DASH)):
        rows = [one(a.captures, child) for _ in range(a.repeats)]
        firsts = [r["captures"][0] for r in rows]
        later = [statistics.median(r["captures"][1:]) for r in rows]
        ratios = [f / l for f, l in zip(firsts, later)]
        lines += [f"**{what}**", "", "| interpreter | load (s) | first (ms) | later, median (ms) | first / later |",
                  "|---|---|---|---|---|"]
        for i, (r, f, l, q) in enumerate(zip(rows, firsts, later, ratios)):
            lines.append(f"| {i + 1} | {r['load']:.2f} | {f * 1000:.0f} | {l * 1000:.0f} | {q:.2f} |")
        m = statistics.median(ratios)
        lines += ["", f"- first / later, median over interpreters: **{m:.2f}x** (target <= 3x: "
                      f"{'met' if m <= 3 else 'not met'}; first {statistics.median(firsts) * 1000:.0f} ms)", ""]
    body = "\n".join(lines)
    print(body)
    if not a.no_write:
        from benchmarks._report import write_section

        write_section("bench_first_capture", "First capture vs later ones (tiny-shapes, cpu)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
