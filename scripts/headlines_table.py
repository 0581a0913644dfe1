"""The dashboard's headlines and the image-vs-text dynamics of the shipped cached runs, per model,
as markdown tables (docs/study.md compares tiny-shapes and smol-shapes with them).

    python scripts/headlines_table.py [--runs cached_runs]

Headlines are :func:`vlmlens.findings.findings` of each run with the sweep and the experiments
stored beside it (the same statements the Overview tab makes, with their status). Dynamics:
per model, the mean over its runs of each geometry curve of the image and the text tokens at
five relative depths (embeddings, 1/4, 1/2, 3/4, last layer).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vlmlens.analysis.geometry import dynamics
from vlmlens.findings import findings
from vlmlens.run_files import is_run_dir, load_run
from vlmlens.run_files import read_extras

KEYS = ("truth", "sweep_cliff", "vtw", "attention_cliff", "stabilisation", "functional", "stages")
CURVES = ("entropy_normalized", "id_twonn", "cosine_distance")
QUARTERS = (0.0, 0.25, 0.5, 0.75, 1.0)


def cell(f) -> str:
    if f is None:
        return "—"
    v = f.value
    if isinstance(v, dict):                                   # the three stages: layer ranges
        v = ", ".join(f"{k} {r[0]}–{r[1]}" if r else f"{k} —" for k, r in v.items())
    v = "yes" if v is True else "no" if v is False else "none" if v is None else str(v)
    return f"{v} ({f.status})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="cached_runs")
    a = ap.parse_args()
    root = Path(a.runs)
    rows, curves = [], {}
    for d in sorted(p for p in root.iterdir() if is_run_dir(p)):
        run = load_run(d)
        extras = read_extras(d)                   # the sweeps (one per mode) and the other results
        fs = {f.key: f for f in findings(run, extras=extras)}
        model = run.meta["model"]
        rows.append(f"| {d.name} | {model} | {run.n_layers} | " + " | ".join(cell(fs.get(k)) for k in KEYS) + " |")
        df = dynamics(run, spans=("image", "text"))
        for (metric, span), g in df.groupby(["metric", "span"]):
            if metric in CURVES:
                curves.setdefault((model, metric, span), []).append(g.sort_values("layer")["value"].to_numpy())
    print("| run | model | layers | " + " | ".join(KEYS) + " |")
    print("|" + "---|" * (len(KEYS) + 3))
    print("\n".join(rows))
    print()
    print("| model | curve | span | " + " | ".join(f"depth {q:g}" for q in QUARTERS) + " |")
    print("|" + "---|" * (len(QUARTERS) + 3))
    for (model, metric, span), cs in sorted(curves.items()):
        n = min(len(c) for c in cs)
        mean = np.nanmean(np.stack([c[:n] for c in cs]), axis=0)
        first = 1 if metric == "cosine_distance" else 0          # its first value sits at layer 1
        at = [mean[min(n - 1, max(0, round(q * (n - 1 + first)) - first))] for q in QUARTERS]
        print(f"| {model} | {metric} | {span} | " + " | ".join(f"{x:.3g}" for x in at) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
