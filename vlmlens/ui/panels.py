"""What each tab shows, computed from an Entry (a Run + its results); no gradio here.

Every figure comes from the topic modules (``vlmlens.figures.*``, ``vlmlens.analysis.*``),
imported directly. When a figure fails on this run, the panel gets a figure saying so
instead of an exception; the failure is logged. Results that depend on the run alone are
cached in ``entry.derived``, so moving a slider re-draws one figure from stored arrays and
never touches the model.
"""
from __future__ import annotations

import logging

import numpy as np

from ..analysis.attention import attention_cliff, stage_bands, three_stages
from ..errors import InputError
from ..figures._style import empty_figure
from ..findings import findings, sweep_cliff_finding
from .markup import show_token

log = logging.getLogger("vlmlens.ui")


class Missing(Exception):
    """What a panel needs is not in this run (e.g. no attention maps recorded, no model for
    LLaVA-CAM): the panel says so in a message figure."""


def message_figure(text: str, title: str | None = None):
    return empty_figure(text, title=title, height=260)


#: figures that read the image tokens of the sequence, which a cross-attention model (Mllama) has none of
IMAGE_ROW_FIGURES = ("fig_attention_flow", "fig_attention_heads", "fig_cam_grid", "fig_cam_layer", "fig_head_maps",
                     "fig_patch_lens", "fig_dynamics", "fig_layer_similarity", "fig_token_movement")


def cross_attention_reason(run) -> str | None:
    """Why a view of the sequence's image tokens is not defined for this run (None: it is)."""
    cross = run.meta.get("cross_attention_layers") if hasattr(run, "meta") else None
    if not cross:
        return None
    return (f"Not defined for this model: it reads the image only by cross-attention (decoder layers {cross}); its "
            "sequence holds one <|image|> placeholder and no image tokens, so this view would show the placeholder, "
            "not the image. The cross-attention layers' maps over the image's patches are in the run "
            "(cross_attention_maps).")


def figure(fn, *args, title: str | None = None, **kwargs):
    """``fn(*args, **kwargs)``: the figure, or a message figure saying why it could not draw
    this run (the failure is logged; the dashboard keeps serving)."""
    why = cross_attention_reason(args[0]) if args and getattr(fn, "__name__", "") in IMAGE_ROW_FIGURES else None
    if why:
        return message_figure(why, title)
    try:
        return fn(*args, **kwargs)
    except Missing as e:
        return message_figure(str(e), title)
    except Exception as e:  # a bug or an unsupported run: say so, keep the dashboard alive
        # a figure drawn ahead while the program ends fails on a refused import: not a bug worth a traceback
        (log.debug if refused_at_exit(e) else log.exception)("%s failed", getattr(fn, "__name__", fn), exc_info=True)
        name = getattr(fn, "__name__", "figure")
        return message_figure(f"{name} could not draw this run: {type(e).__name__}: {str(e)[:160]}", title)


def refused_at_exit(error: BaseException) -> bool:
    """Whether ``error`` is Python refusing work because the program ends (a view drawn ahead still running at
    exit: a lazily imported library cannot register its exit handler, a pool takes no new work). No bug of the
    run or of vlmlens. (The main thread still counts as alive then: Python waits for the drawing thread before
    it stops the main one, so the error is the only sign.)"""
    return isinstance(error, RuntimeError) and "shutdown" in str(error)


def safe(fn, default=None):
    """fn() or ``default`` (logged) when the analysis is missing or fails on this run."""
    try:
        return fn()
    except Missing:
        return default
    except Exception as e:
        (log.debug if refused_at_exit(e) else log.exception)("analysis failed", exc_info=True)
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
    return entry.derived.get("attention_cliff", lambda: safe(lambda: attention_cliff(entry.run)))


def _stages(entry):
    def compute():
        if "attn_out" not in entry.run.arrays:
            return None
        return stage_bands(three_stages(entry.run))
    return entry.derived.get("stage_bands", lambda: safe(compute))


def sweep_cliff(sweep: dict | None) -> int | None:
    """Sweep-side cliff: the shallowest depth from which every deeper depth keeps the answer
    (:func:`vlmlens.findings.sweep_cliff_finding`)."""
    return sweep_cliff_finding(sweep).value if sweep else None


def run_findings(entry) -> list:
    """The run's headlines (:func:`vlmlens.findings.findings`) from the run, its sweep and extras;
    cached per run until the sweep or an extra changes."""
    ex = entry.extras
    key = ("findings", content_key(entry.sweeps), content_key(ex.get("stages")),
           content_key(ex.get("substitution")), content_key(ex.get("compute")))
    return entry.derived.get(key, lambda: findings(entry.run, sweep=entry.sweep, extras=ex))


def content_key(result) -> str:
    """Cache key of a stored result (its content, so equal results share a figure; "" for None)."""
    import hashlib
    import json

    return "" if result is None else hashlib.sha1(json.dumps(result, sort_keys=True, default=str).encode()).hexdigest()


STATUS_BADGE = {"causal": "✔ causal", "measured": "measured", "proxy": "proxy", "not found": "not found",
                "unverified": "unverified"}


#: each headline's question in a student's words (the precise definition stays one hover away)
QUESTIONS = {"truth": "Is the answer right?",
             "sweep_cliff": "From which layer can the image be cut without changing the answer?",
             "vtw": "From which layer can the image be withdrawn with almost no change to the output?",
             "freeze": "From which layer can the image tokens stop being updated?",
             "attention_cliff": "From which layer does the answer stop looking at the image?",
             "stabilisation": "From which layer do the image tokens stop changing?",
             "functional": "From which layer do the image tokens already hold what later layers need?",
             "stages": "What does each group of layers do with the image? (tested by knocking layers out)",
             "stages_proxy": "The same, guessed from how similar the tokens stay (a stand-in, not a test)",
             "compute": "How much computation does cutting at that layer save?"}
#: sentences that reconcile two headlines a student may read as contradicting each other
RECONCILE = (("stages", "stages_proxy", "The two “three stages” lines can differ: the first is what knocking layers out "
              "did to the answer, the second a guess from how similar the image tokens stay; when they differ, trust "
              "the first."),
             ("stabilisation", "functional", "“Image tokens stop changing” and “already hold what later layers need” "
              "are different questions: the tokens can keep moving while what the answer needs from them is already "
              "there, so both lines can be true at once."))


def headline_markdown(entry) -> str:
    """The Overview's headline table: each finding's question in plain words, its status (causal /
    measured / proxy / not found / unverified) and its definition on hover; then a sentence for each
    pair of headlines that may read as contradicting each other."""
    lines = ["| headline | finding |", "|---|---|"]
    found = run_findings(entry)
    for f in found:
        q = QUESTIONS.get(f.key) or ("Does this heatmap predict what the answer depends on?"
                                     if f.key.startswith("map_check") else "")
        title = (f'<span title="{_attr(f.definition)}"><b>{f.title}</b></span><br>'
                 + (f"<small><i>{_cell(q)}</i></small><br>" if q else "")
                 + f'<small>{STATUS_BADGE.get(f.status, f.status)}</small>')
        lines.append(f"| {title} | {_cell(f.text)} |")
    lines.append("")
    keys = {f.key for f in found if f.status not in ("unverified",)}
    lines += [f"<small>{say}</small><br>" for a, b, say in RECONCILE if a in keys and b in keys]
    lines.append("<small>✔ causal: read off an intervention this tool ran · measured: a direct measurement, not an "
                 "intervention · proxy: a stand-in rule · hover a headline for its definition</small>")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "&#124;").replace("\n", " ")


def _attr(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("|", "&#124;"))


def comparison_markdown(entry, other_run, other_label: str, other_sweep=None, other_extras=None) -> str:
    """Two runs side by side: prompt, answer, model, and every headline with its status."""
    a = {f.key: f for f in run_findings(entry)}
    b = {f.key: f for f in findings(other_run, sweep=other_sweep, extras=other_extras or {})}
    r = entry.run
    lines = [f"| | **{_cell(entry.label)}** (current) | **{_cell(other_label)}** |", "|---|---|---|",
             f"| prompt | {_cell(r.prompt)} | {_cell(other_run.prompt)} |",
             f"| generation | `{_cell(r.generated_text)}` | `{_cell(other_run.generated_text)}` |",
             f"| model | {_cell(r.meta.get('model'))} ({r.n_layers} layers) | "
             f"{_cell(other_run.meta.get('model'))} ({other_run.n_layers} layers) |",
             f"| interventions | {_cell(r.meta.get('interventions') or 'none')} | "
             f"{_cell(other_run.meta.get('interventions') or 'none')} |"]
    for key in list(a) + [k for k in b if k not in a]:
        fa, fb = a.get(key), b.get(key)
        title = (fa or fb).title
        cell = lambda f: "—" if f is None else f"<small>{STATUS_BADGE.get(f.status, f.status)}</small> {_cell(f.text)}"  # noqa: E731
        lines.append(f"| **{title}** | {cell(fa)} | {cell(fb)} |")
    return "\n".join(lines)


def generation_markdown(entry) -> str:
    run = entry.run
    m = run.meta
    stop = (m.get("generation") or {}).get("stop_reason", "")
    text = run.generated_text or "(nothing generated)"
    ivs = m.get("interventions") or []
    extra = f"  \n*interventions:* `{ivs}`" if ivs else ""
    if m.get("out_of_world"):
        extra += (f"  \n⚠ **This image is unlike the shapes world this model was trained on** ({m['out_of_world']}): "
                  "its answers and the headlines describe a model reading a picture it has never seen. Try an "
                  "example or a random scene.")
    if m.get("unknown_words"):
        words = ", ".join(f"«{w}»" for w in m["unknown_words"])
        extra += (f"  \n⚠ **The model does not know {words}**: it read them as its unknown token, so it answered a "
                  "different question than the one typed; the headlines describe that question. Try the example "
                  "prompts.")
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
        "findings": [{"key": f.key, "status": f.status, "text": f.text} for f in run_findings(entry)],
    }


def check_layer(entry, layer) -> int:
    """A decoder layer of the entry's run, 0..L-1 (InputError otherwise)."""
    L = entry.run.n_layers
    try:
        layer = int(layer or 0)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"layer must be an integer 0..{L - 1}, got {layer!r}") from None
    if not 0 <= layer <= L - 1:
        raise InputError(f"layer {layer} is out of range: this run has decoder layers 0..{L - 1}")
    return layer
