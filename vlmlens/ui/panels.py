"""What each tab shows, computed from an Entry (a Run + its results); no gradio here.

Every figure comes from the topic modules (``vlmlens.figures.*``, ``vlmlens.analysis.*``),
looked up by name at call time. When a function is not in this build, or fails on this
run, the panel gets a figure saying so instead of an exception; the failure is logged.
Results that depend on the run alone are cached in ``entry.derived``, so moving a slider
re-draws one figure from stored arrays and never touches the model.
"""
from __future__ import annotations

import importlib
import logging

import numpy as np

from .html import note, show_token

log = logging.getLogger("vlmlens.ui")


class Missing(Exception):
    """A topic function is not in this build."""


def real(module: str, name: str):
    """``module.name`` or raise Missing (module not there yet, or no such function)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise Missing(f"{module}.{name} is not available in this build ({e.name or e})") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise Missing(f"{module}.{name} is not available in this build")
    return fn


def message_figure(text: str, title: str | None = None):
    try:
        return real("vlmlens.figures._style", "empty_figure")(text, title=title, height=260)
    except Missing:
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False)
        fig.update_layout(title=title, height=260, xaxis_visible=False, yaxis_visible=False)
        return fig


def figure(module: str, name: str, *args, title: str | None = None, **kwargs):
    """Call ``module.name(*args, **kwargs)``; a message figure if it is missing or fails."""
    try:
        return real(module, name)(*args, **kwargs)
    except Missing as e:
        return message_figure(f"Not available in this build: {name}", title or str(e))
    except Exception as e:  # a bug or an unsupported run: say so, keep the dashboard alive
        log.exception("%s.%s failed", module, name)
        return message_figure(f"{name} could not draw this run: {type(e).__name__}: {str(e)[:160]}", title)


def safe(fn, default=None):
    """fn() or ``default`` (logged) when the analysis is missing or fails on this run."""
    try:
        return fn()
    except Missing:
        return default
    except Exception:
        log.exception("analysis failed")
        return default


# ---- token choices -------------------------------------------------------------------------

def query_choices(run) -> list[tuple[str, int]]:
    """Heatmap queries: index 0 = the last prompt token, then each generated token."""
    pos = [int(p) for p in np.asarray(run.map_positions)] if "map_positions" in run.arrays else []
    out = []
    for i, p in enumerate(pos):
        if p >= len(run.tokens):
            continue
        tok = show_token(run.tokens[p])
        label = f"last prompt token «{tok}» (pos {p})" if i == 0 else f"generated #{i}: «{tok}» (pos {p})"
        out.append((label, i))
    return out or [("last prompt token", 0)]


# ---- overview ------------------------------------------------------------------------------

def _cliff(entry):
    return entry.derived.get("attention_cliff", lambda: safe(lambda: real("vlmlens.analysis.attention", "attention_cliff")(entry.run)))


def _stages(entry):
    def compute():
        labels = real("vlmlens.analysis.attention", "three_stages")(entry.run)
        return real("vlmlens.analysis.attention", "stage_bands")(labels)
    return entry.derived.get("stage_bands", lambda: safe(compute))


def _stabilisation(entry) -> dict:
    """Stabilisation layer of the image tokens, per geometry metric (empty when unavailable)."""
    def compute():
        run = entry.run
        if "hidden_states" not in run.arrays or run.spans.n_image < 2:
            return {}
        df = real("vlmlens.figures.dynamics", "run_dynamics")(run)
        return {r["metric"]: r["layer"] for r in df.attrs.get("stabilization", [])
                if r["span"] == "image" and np.isfinite(r["layer"])}
    return entry.derived.get("stabilisation", lambda: safe(compute, {})) or {}


def sweep_cliff(sweep: dict | None) -> int | None:
    """Sweep-side cliff (``vlmlens.experiments.cliff.cliff_layer``): the shallowest depth from
    which every deeper depth keeps the answer with a small first-token KL."""
    if not sweep:
        return None
    try:
        from ..experiments.compare import TruncationResult

        return int(real("vlmlens.experiments.cliff", "cliff_layer")(TruncationResult.from_json(sweep)).cliff)
    except Missing:
        pass
    except Exception:
        log.exception("cliff_layer failed; using the answer-kept rule")
    cliff = None
    for d in sorted(sweep.get("depths", []), key=lambda d: -d["depth"]):
        if not d.get("answer_kept"):
            break
        cliff = d["depth"]
    return cliff


def compute_saved(entry, depth: int | None) -> str | None:
    """Savings of truncating (mode "remove") at ``depth``, from the stored compute trade-off."""
    comp = entry.extras.get("compute")
    if depth is None or not comp or depth not in comp.get("depths", []):
        return None
    i = comp["depths"].index(depth)
    text = (f"{comp['total_saving'][i]:.0%} of decoder FLOPs, {comp['kv_saving'][i]:.0%} of the KV cache"
            f" (depth {depth}, mode remove)")
    if "measured_total_saving" in comp:
        text += f"; measured latency saving {comp['measured_total_saving'][i]:.0%}"
    return text


def headline_markdown(entry) -> str:
    run = entry.run
    L = run.n_layers
    cliff = _cliff(entry)
    sweep = entry.sweep
    s_cliff = sweep_cliff(sweep)
    stab = _stabilisation(entry)
    bands = _stages(entry)
    lines = ["| headline | value |", "|---|---|"]
    lines.append(f"| **attention cliff** (sharpest drop of the last token's image share) | "
                 f"{'—' if cliff is None else f'layer {cliff} of {L}'} |")
    lines.append("| **sweep cliff** (shallowest depth that keeps the answer) | "
                 + (f"depth {s_cliff} ({sweep.get('mode', 'drop')})" if s_cliff is not None else
                    ("no depth keeps the answer" if sweep else "— (no sweep for this run; Truncation tab)")) + " |")
    if stab:
        main = stab.get("entropy_normalized", next(iter(stab.values())))
        others = ", ".join(f"{k} {int(v)}" for k, v in stab.items())
        lines.append(f"| **visual stabilisation** (image tokens stop changing) | layer {int(main)} "
                     f"<small>({others})</small> |")
    else:
        lines.append("| **visual stabilisation** | — (needs hidden states and the geometry module) |")
    if bands:
        txt = " · ".join(f"{lab} {a}–{b}" if a != b else f"{lab} {a}" for lab, a, b in bands)
        lines.append(f"| **three stages** (decoder layers) | {txt} |")
    else:
        lines.append("| **three stages** | — (run has no value contributions) |")
    saved = compute_saved(entry, s_cliff if s_cliff is not None else cliff)
    lines.append(f"| **compute saved at the cliff** | {saved or '— (no compute estimate for this run: Compute tab)'} |")
    return "\n".join(lines)


def generation_markdown(entry) -> str:
    run = entry.run
    m = run.meta
    stop = (m.get("generation") or {}).get("stop_reason", "")
    text = run.generated_text or "(nothing generated)"
    ivs = m.get("interventions") or []
    extra = f"  \n*interventions:* `{ivs}`" if ivs else ""
    return (f"**Prompt:** {run.prompt}  \n**Generation:** `{text}`  \n"
            f"<small>{entry.label} · model `{m.get('model')}` · {run.n_layers} layers · "
            f"{run.spans.n_total - run.spans.n_prompt} new tokens ({stop}) · "
            f"{run.spans.n_image} image tokens {run.image_grid[0]}×{run.image_grid[1]}</small>{extra}")


def run_info(entry) -> dict:
    """JSON summary of the current run (the API's handle on it)."""
    run = entry.run
    s = run.spans
    return {
        "run_id": entry.id, "label": entry.label, "source": entry.source,
        "model": run.meta.get("model"), "prompt": run.prompt, "generated_text": run.generated_text,
        "generated_tokens": run.generated_tokens, "n_layers": run.n_layers, "n_tokens": s.n_total,
        "n_image_tokens": s.n_image, "image_grid": list(run.image_grid),
        "attention_cliff": _cliff(entry), "sweep_cliff": sweep_cliff(entry.sweep),
        "has_sweep": entry.sweep is not None, "stages": [list(b) for b in (_stages(entry) or [])],
        "visual_stabilisation": {k: int(v) for k, v in _stabilisation(entry).items()},
    }
