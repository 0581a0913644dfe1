"""Figures of the Heatmaps, Dynamics and Attention tabs for one Entry (no gradio here).

Heatmaps read the attention maps / CAM stored with the run, so moving the layer slider
redraws from arrays. LLaVA-CAM needs the model once per run (``llava_cam(lm, run)``); the
result is cached in ``entry.derived`` (or read from the run when it was stored with it).
"""
from __future__ import annotations

import numpy as np

from ..analysis.cam import llava_cam
from ..figures.attention import fig_attention_flow, fig_attention_heads, fig_cross_attention, fig_frame_attention
from ..figures.dynamics import fig_dynamics, fig_layer_similarity, fig_token_umap
from ..figures.movement import fig_token_movement
from ..figures.heatmaps import fig_cam_grid, fig_cam_layer, fig_head_maps, fig_logit_lens, fig_patch_lens
from ..metrics import NOISE_FLOOR
from .panels import Missing, figure, message_figure

HEATMAP_KINDS = ("attention", "LLaVA-CAM")


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
    if lm.arch.cross_attention:
        raise Missing(f"LLaVA-CAM is not defined for {lm.family}: it weights the image tokens' rows of the sequence, and"
                      " this model reads the image by cross-attention (its sequence holds no image tokens)")
    return entry.derived.get("llava_cam", lambda: np.asarray(llava_cam(lm, run, video=entry.video).per_token,
                                                             dtype=np.float32))


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


def no_attention_reason(run, values: np.ndarray, layer: int) -> str | None:
    """Why a layer's attention map is empty (``values``: [layer, n_image]): a hybrid stack's linear-attention
    / convolution layer has no attention weights (the run holds NaN there, never a made-up map)."""
    row = values[int(layer)]
    cross = run.meta.get("cross_attention_layers")
    if cross and row.size and np.isnan(row).all():
        return (f"This model reads the image only by cross-attention (decoder layers {cross}): its sequence holds no "
                "image tokens, so no map over them is defined at any layer. The cross-attention layers' own maps "
                "over the image's patches are recorded in the run (cross_attention_maps).")
    if row.size and np.isnan(row).all():
        return (f"Layer {int(layer)} has no softmax attention (a linear-attention or convolution layer of this hybrid "
                f"model): attention over the image is not defined there. Attention layers: "
                f"{run.meta.get('attention_layers', 'see the model')}.")
    return None


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
    why = cam_zero_reason(run, values, int(layer)) if kind == "LLaVA-CAM" else no_attention_reason(run, values, layer)
    if why is not None:
        fig = message_figure(why, f"{kind} — layer {int(layer)}")
        entry.derived.put(key, fig)
        return fig
    cam = kind == "LLaVA-CAM"
    fig = figure(fig_cam_layer, run, int(layer), "cam" if cam else "attention", cams=values if cam else None,
                 query_index=int(query), title=kind)
    entry.derived.put(key, fig)
    return fig


def heatmap_grid(entry, query: int, kind: str, lm=None):
    run = entry.run

    def compute():
        try:
            values = layer_values(entry, kind, query, lm)
        except Missing as e:
            return message_figure(str(e), kind)
        cam = kind == "LLaVA-CAM"
        return figure(fig_cam_grid, run, values if cam else None, "cam" if cam else "attention",
                      query_index=int(query), title=kind)
    return entry.derived.get(("grid", int(query), kind), compute)


def logit_lens_figures(entry):
    """(logit lens of the last prompt / generated tokens, patch lens of every layer with its
    own slider), from the arrays stored with the run (``attach_logit_lens``)."""
    run = entry.run
    if "logit_lens_ids" not in run.arrays:
        m = message_figure("This run holds no logit lens (captured without it; needs the run's model).", "Logit lens")
        return m, m
    ll = entry.derived.get("fig_logit_lens", lambda: figure(fig_logit_lens, run, title="Logit lens"))
    pl = entry.derived.get("fig_patch_lens", lambda: figure(fig_patch_lens, run, title="Patch lens"))
    return ll, pl


# ---- dynamics / attention tabs ------------------------------------------------------------------

def dynamics_figures(entry, span: str = "image"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        m = message_figure("This run stored no hidden states (captured with store='none').")
        return m, m, m
    dyn = entry.derived.get("fig_dynamics", lambda: figure(fig_dynamics, run, title="Dynamics"))
    cka = entry.derived.get(("fig_cka", span), lambda: figure(fig_layer_similarity, run, span, title="CKA"))
    move = entry.derived.get("fig_movement", lambda: figure(fig_token_movement, run, title="Token movement"))
    return dyn, cka, move


def encoder_decoder_figure(entry):
    """The image's geometry across the vision tower's layers and then the decoder's (one axis)."""
    from ..figures.encoder import fig_encoder_decoder_dynamics

    run = entry.run
    if "vision_hidden_states" not in run.arrays or "hidden_states" not in run.arrays:
        return message_figure("This run holds no vision-tower states (runs captured in the dashboard do; saved runs "
                              "made before, or with capture(record_vision=False), do not).", "Encoder and decoder")
    return entry.derived.get("fig_enc_dec", lambda: figure(fig_encoder_decoder_dynamics, run,
                                                           title="Encoder and decoder"))


def embedding_figure(entry, method: str = "pca"):
    run = entry.run
    if "hidden_states" not in run.arrays:
        return message_figure("This run stored no hidden states.")
    return entry.derived.get(("fig_embed", method),
                             lambda: figure(fig_token_umap, run, method=method, title="Token map"))


def attention_figures(entry):
    """(attention flow with the knockout stages when the run has them, per-head shares, the
    stage windows as markdown)."""
    run = entry.run
    st = entry.extras.get("stages")
    labels = st.get("labels") if st else None
    if run.meta.get("cross_attention_layers") and "cross_attention_maps" in run.arrays:
        flow = entry.derived.get("fig_cross_attention", lambda: figure(fig_cross_attention, run, title=None))
    else:
        flow = entry.derived.get(("fig_attention_flow", tuple(labels or ())), lambda: figure(
            fig_attention_flow, run, stages=labels, title="Attention flow"))
    heads = entry.derived.get("fig_attention_heads", lambda: figure(fig_attention_heads, run, title="Heads"))
    return flow, heads, stages_markdown(st)


def frames_figure(entry):
    """A video run's attention on each temporal slot per layer (a message for an image run)."""
    run = entry.run
    if not run.meta.get("video"):
        return message_figure("This run's input is an image. Capture a video (the Video box of the input panel, "
                              "a Qwen-VL family) to see the attention on each of its temporal slots.", "Frames")
    return entry.derived.get("fig_frames", lambda: figure(fig_frame_attention, run, title=None))


def head_maps_figure(entry, layer: int):
    """Each head's map over the image at decoder ``layer`` (last prompt token), cached per layer."""
    run = entry.run
    if "attention_head_maps" not in run.arrays:
        return message_figure("This run holds no per-head maps (captured before they were recorded).", "Heads")
    return entry.derived.get(("fig_head_maps", int(layer)), lambda: figure(fig_head_maps, run, int(layer), title="Heads"))


def stages_markdown(st: dict | None) -> str:
    """The knockout windows behind the three stages, as a table (or how to get them)."""
    if not st:
        return ("**Three stages (causal):** not measured for this run. Press *Find the three stages* (needs the run's "
                "model): it knocks the image out of every single layer, every prefix and every suffix of layers and "
                "reads what happens to the output. Until then the bands are VisiPruner's cosine rule, a *proxy*.")
    if "undefined" in st:
        return f"**Three stages (causal):** not defined for this model: {st['undefined']}."
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


# ---- two runs ------------------------------------------------------------------------------------

def compare_attention(run, other, other_label: str):
    """Attention flow of ``run`` with ``other`` dashed (needs both to have recorded attention)."""
    if "attention_to_image" not in run.arrays or "attention_to_image" not in other.arrays:
        return message_figure("Both runs need recorded attention to the image.", "Attention flow")
    return figure(fig_attention_flow, run, other, title=f"Attention to the image — current vs {other_label} (dashed)")


def compare_dynamics(run, other, other_label: str):
    """Geometry curves of ``run`` with ``other`` dashed (needs both to have hidden states)."""
    if "hidden_states" not in run.arrays or "hidden_states" not in other.arrays:
        return message_figure("Both runs need stored hidden states.", "Dynamics")
    return figure(fig_dynamics, run, other, other_label=other_label, title="Dynamics")
