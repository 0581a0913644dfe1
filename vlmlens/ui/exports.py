"""Downloads of the current run: the run folder as a zip, per-layer metrics as CSV, figures
as one self-contained HTML page (no gradio here)."""
from __future__ import annotations

import html
import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..analysis.attention import attention_share
from ..figures.dynamics import run_dynamics
from ..run_files import save_run
from ..tables import Table
from .panels import Missing, safe


def _tmpdir(prefix: str, base: Path | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"vlmlens-{prefix}-", dir=base))


class ExportDirs:
    """Where downloads are written: one temp folder per download, the oldest removed once more
    than ``keep`` exist (gradio copies a served file into its own cache, which the app clears
    itself), and all of them on :meth:`close`. Disk use stays bounded."""

    def __init__(self, keep: int = 8) -> None:
        import threading
        from collections import deque

        self.keep = int(keep)
        self._dirs: deque[Path] = deque()
        self._lock = threading.Lock()

    def new(self) -> Path:
        import shutil

        d = Path(tempfile.mkdtemp(prefix="vlmlens-download-"))
        with self._lock:
            self._dirs.append(d)
            while len(self._dirs) > self.keep:
                shutil.rmtree(self._dirs.popleft(), ignore_errors=True)
        return d

    def close(self) -> None:
        import shutil

        with self._lock:
            while self._dirs:
                shutil.rmtree(self._dirs.popleft(), ignore_errors=True)


def safe_stem(label: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(label))[:48].strip("-.")
    return keep or "run"


def run_zip(entry, base: Path | None = None) -> Path:
    """Zip of run.json + arrays.safetensors + image.png (+ sweep.json / extras.json); the
    unzipped copy is removed, only the zip stays (in ``base``, else a new temp folder)."""
    import shutil

    tmp = _tmpdir("zip", base)
    stem = safe_stem(entry.label)
    d = save_run(entry.run, tmp / stem, extras=entry.extras)
    out = tmp / f"{stem}.zip"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in sorted(d.iterdir()):
            z.write(f, arcname=f"{stem}/{f.name}")
    shutil.rmtree(d, ignore_errors=True)
    return out


def metric_rows(entry) -> list[dict]:
    """Tidy per-layer metrics: attention share, stages, geometry curves, truncation sweep."""
    run = entry.run
    rows: list[dict] = []

    def add(metric, span, layer, value):
        v = float(value) if value is not None else math.nan
        rows.append({"metric": metric, "span": span, "layer": int(layer), "value": v})

    share = safe(lambda: attention_share(run, query="last").image)
    if share is not None:
        for l, v in enumerate(np.asarray(share)):
            add("attention_share_image", "last", l, v)
    try:
        from ..analysis.attention import stage_details

        st = stage_details(run)
        for l, lab in enumerate(st.labels):
            rows.append({"metric": "stage", "span": lab, "layer": l, "value": float(st.cos[l])})
    except Exception:
        pass
    if "hidden_states" in run.arrays:
        df = safe(lambda: run_dynamics(run))
        if df is not None:
            for r in df.itertuples(index=False):
                add(r.metric, r.span, r.layer, r.value)
    for mode, sweep in entry.sweeps.items():      # every mode's sweep, each row saying its mode
        for d in sweep.get("depths", []):
            for metric, v in (("sweep_output_kl", d.get("output_kl")), ("sweep_first_token_kl", d.get("first_token_kl")),
                              ("sweep_answer_kept", float(bool(d.get("answer_kept"))))):
                add(metric, mode, d["depth"], v)
                rows[-1]["mode"] = mode
    return rows


def metrics_csv(entry, base: Path | None = None) -> Path:
    out = _tmpdir("csv", base) / f"{safe_stem(entry.label)}-metrics.csv"
    out.write_text(Table(["metric", "span", "layer", "value", "mode"], metric_rows(entry)).csv())   # mode: sweep rows
    return out


def figures_html(entry, figures: list, base: Path | None = None) -> Path:
    """One HTML page holding ``figures`` (plotly.js embedded once, so it works offline)."""
    out = _tmpdir("html", base) / f"{safe_stem(entry.label)}-figures.html"
    label = html.escape(str(entry.label))
    parts = [f"<html><head><meta charset='utf-8'><title>vlmlens — {label}</title></head><body>",
             f"<h2>vlmlens — {label}</h2><p>prompt: {html.escape(entry.run.prompt)} · generation: "
             f"{html.escape(entry.run.generated_text)}</p>"]
    first = True
    for fig in figures:
        if fig is None or not hasattr(fig, "to_html"):
            continue
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if first else False))
        first = False
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


__all__ = ["run_zip", "metrics_csv", "figures_html", "metric_rows", "Missing"]
