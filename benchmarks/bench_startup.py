"""Start-up of the command line and the package: ``python -m vlmlens --help``, ``import vlmlens``,
and what a first model-free step costs (a command's own --help, then the first torch-using import).

Each is a fresh interpreter (what a user waits for), timed ``--repeats`` times; the median is
reported with whether torch was loaded. Run it on a quiet machine:

    python benchmarks/bench_startup.py             # writes its section of BENCHMARKS.md
    python benchmarks/bench_startup.py --no-write
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    ("python -m vlmlens --help", [sys.executable, "-m", "vlmlens", "--help"], None),
    ("python -m vlmlens sweep --help", [sys.executable, "-m", "vlmlens", "sweep", "--help"], None),
    ("import vlmlens", [sys.executable, "-c", "import sys, vlmlens; print('torch' in sys.modules)"], "torch"),
    ("import vlmlens; vlmlens.capture (loads torch)",
     [sys.executable, "-c", "import sys, vlmlens; vlmlens.capture; print('torch' in sys.modules)"], "torch"),
]


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
    return dt, r.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args(argv)
    rows = []
    for label, cmd, probe in CASES:
        runs = [timed(cmd) for _ in range(args.repeats)]
        med = statistics.median(t for t, _ in runs)
        torch = runs[-1][1].strip().splitlines()[-1] if probe else "–"
        rows.append((label, med, torch))
        print(f"{label:48s} {med:6.2f} s   torch loaded: {torch}")
    body = ("Median of %d fresh interpreters each. Target (#27): `--help` <= 1 s. Before the lazy package and the"
            " per-command parser, `python -m vlmlens --help` imported torch and every command's module (8.2 s on"
            " this machine under load, 6.6 s quiet).\n\n| what | seconds | torch loaded |\n|---|---|---|\n"
            % args.repeats) + "\n".join(f"| `{label}` | {med:.2f} | {torch} |" for label, med, torch in rows) + (
            "\n\nA command's own `--help` reads the words users type (cut modes, the cliff rule's tau, the method"
            " syntax) from `vlmlens/vocabulary.py`, which imports nothing.\n")
    if not args.no_write:
        from benchmarks._report import write_section

        write_section("startup", "Start-up: the command line and `import vlmlens`", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
