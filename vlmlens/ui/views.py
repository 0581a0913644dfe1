"""Figures of the Heatmaps, Dynamics and Attention tabs for one Entry (no gradio here).

Heatmaps read the attention maps / CAM stored with the run, so moving the layer slider
redraws from arrays. LLaVA-CAM needs the model once per run (``llava_cam(lm, run)``); the
result is cached in ``entry.derived`` (or read from the run when it was stored with it).
"""
from __future__ import annotations

import base64
import io

import numpy as np

from ..findings import NOISE_FLOOR
from .panels import Missing, figure, log, message_figure, real

HEATMAP_KINDS = ("attention", "LLaVA-CAM")
FIG_HEAT = "vlmlens.figures.heatmaps"
FIG_ATT = "vlmlens.figures.attention"
FIG_DYN = "vlmlens.figures.dynamics"


def _image_uri(run) -> str:
    buf = io.BytesIO()
    run.image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def layer_values(entry, kind: str, query: int, lm=None) -> np.ndarray:
    """[layer, n_image] values drawn by the heatmaps: head-averaged attention of one query
    (``attention``) or LLaVA-CAM (per layer, normalised to max 1)."""
    run = entry.run
    if kind == "LLaVA-CAM":
        return cam_array(entry, lm)
    if "attention_maps" not in run.arrays:
        raise Missing("this run recorded no attention maps")
    maps = run.attention_maps
    return maps[:, int(np.clip(query, 0, maps.shape[1] - 1))]


def _query_label(run, query: int) -> str:
    qpos = int(run.map_positions[query]) if "map_positions" in run.arrays else run.spans.n_prompt - 1
    tok = run.tokens[qpos] if qpos < len(run.tokens) else "?"
    return f"«{tok}» (pos {qpos})"


def grid_heatmap(run, values: np.ndarray, layer: int, *, kind: str, query: int = 0, image_uri: str | None = None):
    """One layer's map on the image grid, drawn over the image (the dashboard's own view)."""
    import plotly.graph_objects as go

    layer = int(np.clip(layer, 0, values.shape[0] - 1))
    grid = run.to_grid(values[layer])
    rows, cols = grid.shape
    what = "attention" if kind == "attention" else "CAM"
    who = f"query {_query_label(run, query)}" if kind == "attention" else "answer tokens"
    zmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=grid, x=np.arange(cols), y=np.arange(rows), customdata=run.grid_index, colorscale="Viridis", opacity=0.62,
        zmin=0.0, zmax=zmax or 1.0, colorbar=dict(title=what),
        hovertemplate=(f"layer {layer} · {who}<br>row %{{y}}, col %{{x}} · image token %{{customdata}}"
                       f"<br>{what} %{{z:.4f}}<extra></extra>")))
    fig.add_layout_image(dict(source=image_uri or _image_uri(run), xref="x", yref="y", x=-0.5, y=-0.5,
                              sizex=cols, sizey=rows, sizing="stretch", layer="below"))
    fig.update_xaxes(range=[-0.5, cols - 0.5], showgrid=False, title="patch column")
    fig.update_yaxes(range=[rows - 0.5, -0.5], showgrid=False, scaleanchor="x", title="patch row")
    title = (f"Attention to the image — layer {layer}, query {_query_label(run, query)}" if kind == "attention"
             else f"LLaVA-CAM — layer {layer}")
    fig.update_layout(title=title, height=430, margin=dict(l=50, r=20, t=60, b=40), template="plotly_white")
    return fig


def grid_multiples(run, values: np.ndarray, *, kind: str):
    """Small multiples: the map at every decoder layer, one colour scale."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    L = values.shape[0]
    cols_n = min(8, L)
    rows_n = -(-L // cols_n)
    fig = make_subplots(rows=rows_n, cols=cols_n, subplot_titles=[f"layer {l}" for l in range(L)],
                        horizontal_spacing=0.01, vertical_spacing=0.06)
    zmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    what = "attention" if kind == "attention" else "CAM"
    for l in range(L):
        fig.add_trace(go.Heatmap(z=run.to_grid(values[l]), coloraxis="coloraxis", customdata=run.grid_index,
                                 hovertemplate=f"layer {l}<br>row %{{y}}, col %{{x}} · image token %{{customdata}}"
                                               f"<br>{what} %{{z:.4f}}<extra></extra>"),
                      row=l // cols_n + 1, col=l % cols_n + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0, cmax=zmax or 1.0), height=150 * rows_n + 80,
                      title=f"{'Attention to the image' if kind == 'attention' else 'LLaVA-CAM'} across layers",
                      margin=dict(l=10, r=10, t=60, b=10), template="plotly_white")
    return fig


# ---- heatmaps tab --------------------------------------------------------------------------

def cam_array(entry, lm=None) -> np.ndarray:
    """[layer, n_image] LLaVA-CAM of the run: stored with it, cached, or computed once with
    ``lm`` (Missing when there is no way to get it)."""
    run = entry.run
    if "llava_cam" in run.arrays:
        return np.asarray(run.arrays["llava_cam"], dtype=np.float32)
    hit = entry.derived.peek("llava_cam")
    if hit is not None:
        return hit
    if lm is None:
        raise Missing("LLaVA-CAM of this run needs the run's model (it was not stored with the run)")
    if lm.name != run.meta.get("model"):
        raise Missing(f"LLaVA-CAM needs the run's own model ({run.meta.get('model')}); the loaded model is {lm.name}")
    fn = real("vlmlens.analysis.cam", "llava_cam")
    return entry.derived.get("llava_cam", lambda: np.asarray(fn(lm, run).per_token, dtype=np.float32))


def cam_zero_reason(run, values: np.ndarray, layer: int) -> str | None:
    """Why a layer's LLaVA-CAM is all zero, in words (None when it is not)."""
    row = np.asarray(values[int(layer)], dtype=np.float64)
    if np.isfinite(row).any() and np.nanmax(np.abs(row)) > 0:
        return None
    tap = (run.meta.get("llava_cam") or {}).get("activation", "mlp_input")
    L = values.shape[0]
    if layer == L - 1:
        return (f"LLaVA-CAM is zero at the last layer by construction: it weights the image rows' {tap} by the gradient"
                " of the answer, and what layer " f"{L - 1} computes for image rows is never read by the answer (no later"
                " layer attends to it). Look at layers 0–" f"{L - 2}.")
    return (f"LLaVA-CAM is zero everywhere at layer {layer}: after the ReLU no image patch has a positive"
            " gradient-weighted activation here (every patch's weighted sum is <= 0), so this layer's map is empty, "
            "not missing.")


def heatmap_layer(entry, layer: int, query: int, kind: str, lm=None):
    """The single-layer heatmap (cached per layer / query / kind); never runs the model
    unless LLaVA-CAM is asked for and the run does not hold it yet."""
    key = ("heatmap", int(layer), int(query), kind)
    hit = entry.derived.peek(key)
    if hit is not None:
        return hit
    run = entry.run
    try:
        values = layer_values(entry, kind, query, lm)
    except Missing as e:
        return message_figure(str(e), kind)
    why = cam_zero_reason(run, values, int(layer)) if kind == "LLaVA-CAM" else None
    if why is not None:
        fig = message_figure(why, f"LLaVA-CAM — layer {int(layer)}")
        entry.derived.put(key, fig)
        return fig
    try:
        cam = kind == "LLaVA-CAM"
        fig = real(FIG_HEAT, "fig_cam_layer")(run, int(layer), "cam" if cam else "attention",
                                               cams=values if cam else None, query_index=int(query))
    except Exception as e:
        if not isinstance(e, Missing):
            log.warning("fig_cam_layer failed (%s); drawing the dashboard's own heatmap", e)
        uri = entry.derived.get("image_uri", lambda: _image_uri(run))
        fig = grid_heatmap(run, values, layer, kind=kind, query=query, image_uri=uri)
    entry.derived.put(key, fig)
    return fig


def heatmap_grid(entry, query: int, kind: str, lm=None):
    run = entry.run

    def compute():
        try:
            values = layer_values(entry, kind, query, lm)
        except Missing as e:
            return message_figure(str(e), kind)
        try:
            cam = kind == "LLaVA-CAM"
            return real(FIG_HEAT, "fig_cam_grid")(run, values if cam else None, "cam" if cam else "attention",
                                                  query_index=int(query))
        except Exception as e:
            if not isinstance(e, Missing):
                log.warning("fig_cam_grid failed (%s); drawing the dashboard's own grid", e)
            return grid_multiples(run, values, kind=kind)
    return entry.derived.get(("grid", int(query), kind), compute)


def logit_lens_figures(entry):
    """(logit lens of the last prompt / generated tokens, patch lens of every layer with its
    own slider), from the arrays stored with the run (``attach_logit_lens``)."""
    run = entry.run
    if "logit_lens_ids" not in run.arrays:
        m = message_figure("This run holds no logit lens (captured without it; needs the run's model).", "Logit lens")
        return m, m
    ll = entry.derived.get("fig_logit_lens", lambda: figure(FIG_HEAT, "fig_logit_lens", run, title="Logit lens"))
    pl = entry.derived.get("fig_patch_lens", lambda: figure(FIG_HEAT, "fig_patch_lens", run, title="Patch lens"))
    return ll, pl


# ---- dynamics / attention tabs ------------------------------------------------------------------

def dynamics_figures(entry, span: str = "image"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        m = message_figure("This run stored no hidden states (captured with store='none').")
        return m, m, m
    from ..figures.dynamics import fig_token_movement

    dyn = entry.derived.get("fig_dynamics", lambda: figure(FIG_DYN, "fig_dynamics", run, title="Dynamics"))
    cka = entry.derived.get(("fig_cka", span), lambda: figure(FIG_DYN, "fig_layer_similarity", run, span, title="CKA"))
    move = entry.derived.get("fig_movement", lambda: figure_call(fig_token_movement, run, title="Token movement"))
    return dyn, cka, move


def embedding_figure(entry, method: str = "pca"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        return message_figure("This run stored no hidden states.")
    return entry.derived.get(("fig_embed", method),
                             lambda: figure(FIG_DYN, "fig_token_umap", run, method=method, title="Token map"))


def attention_figures(entry):
    """(attention flow with the knockout stages when the run has them, per-head shares, the
    stage windows as markdown)."""
    from ..figures.attention import fig_attention_flow

    run = entry.run
    st = entry.extras.get("stages")
    labels = st.get("labels") if st else None
    flow = entry.derived.get(("fig_attention_flow", tuple(labels or ())), lambda: figure_call(
        fig_attention_flow, run, stages=labels, title="Attention flow"))
    heads = entry.derived.get("fig_attention_heads", lambda: figure(FIG_ATT, "fig_attention_heads", run, title="Heads"))
    return flow, heads, stages_markdown(st)


def figure_call(fn, *args, title: str | None = None, **kwargs):
    """``fn(*args, **kwargs)``, or a figure saying why it could not draw this run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # keep the dashboard alive on a run a figure cannot draw
        log.exception("%s failed", getattr(fn, "__name__", fn))
        return message_figure(f"{getattr(fn, '__name__', 'figure')} could not draw this run: {type(e).__name__}: "
                              f"{str(e)[:160]}", title)


def stages_markdown(st: dict | None) -> str:
    """The knockout windows behind the three stages, as a table (or how to get them)."""
    if not st:
        return ("**Three stages (causal):** not measured for this run. Press *Find the three stages* (needs the run's "
                "model): it knocks the image out of every single layer, every prefix and every suffix of layers and "
                "reads what happens to the output. Until then the bands are VisiPruner's cosine rule, a *proxy*.")
    L = st["n_layers"]
    n = len(st["single"]) + len(st["prefix"]) + len(st["suffix"]) + (1 if st.get("joint") else 0)
    lines = [f"**Three stages (causal, knockout windows):** {st['statement']}", "",
             f"<small>{st['rule']} (tau = {st['tau']} nats).</small>", "",
             f"<details><summary>the {n} knockout windows</summary>", "",
             "| layers knocked out | KL over the output (nats) | Δ log p | output kept |", "|---|---|---|---|"]

    def row(w, what):
        kl = w["answer_kl"]
        shown = "no change" if kl < NOISE_FLOOR else f"{kl:.3g}"
        lines.append(f"| {what} | {shown} | {w['answer_logprob_delta']:+.3g} | {'yes' if w['kept'] else 'no'} |")
    for w in st["single"]:
        row(w, f"layer {w['first']} alone")
    for w in st["prefix"]:
        row(w, f"0–{w['last']} (prefix)")
    for w in st["suffix"]:
        row(w, f"{w['first']}–{L - 1} (suffix)")
    if st.get("joint"):
        row(st["joint"], "sink + discard together")
    lines += ["", "</details>"]
    return "\n".join(lines)
