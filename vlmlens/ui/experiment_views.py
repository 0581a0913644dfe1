"""Experiment tabs (truncation, substitution / skipping, compute): run them on the current
run's image and prompt with the loaded model, keep the results (JSON) with the entry, and
draw them (no gradio here)."""
from __future__ import annotations

from ..analysis.compute import compute_tradeoff
from ..experiments.cliff import reasoning_perturbation
from ..experiments.skip import SkipScanResult, layer_skip_scan
from ..experiments.substitution import SubstitutionResult, substitution_matrix
from ..experiments.encoder import EncoderGrid, encoder_decoder_grid
from ..figures.encoder import fig_encoder_grid
from ..figures.pruning import fig_kept_tokens
from ..figures.experiments import fig_reasoning_perturbation, fig_sweep_modes
from ..figures.matrices import fig_compute_tradeoff, fig_layer_skip, fig_substitution_matrix
from ..findings import sweep_statements
from .markup import generations_table, note
from .panels import content_key, figure, message_figure
SWEEP_CHOICE = "all (sweep)"


def depth_choices(n_layers: int) -> list[str]:
    return [SWEEP_CHOICE] + [str(k) for k in range(n_layers + 1)]


def parse_depth_selection(selected, n_layers: int) -> tuple[list[int], bool]:
    """(depths, is_sweep) from the multi-select; InputError on an empty or out-of-range pick."""
    from ..errors import InputError

    items = [selected] if isinstance(selected, (str, int)) else list(selected or [])
    if not items:
        raise InputError(f"pick at least one depth (0..{n_layers}) or '{SWEEP_CHOICE}'")
    if any(str(x).strip() == SWEEP_CHOICE for x in items):
        return list(range(n_layers + 1)), True
    from ..experiments.engine import parse_depths

    words = [str(x).split() for x in items]
    if any(not w for w in words):
        raise InputError(f"empty depth in {items!r}; pick depths 0..{n_layers} or '{SWEEP_CHOICE}'")
    return parse_depths([w[0] for w in words], n_layers), False


def _run_args(entry):
    run = entry.run
    gen = run.meta.get("generation") or {}
    return entry.rerun_input(), run.prompt, int(gen.get("max_new_tokens", max(1, len(run.generated_tokens))))


def check_model_matches(lm, entry) -> None:
    from ..errors import InputError

    want = entry.run.meta.get("model")
    if want and lm.name != want:
        raise InputError(f"this run was captured with {want!r} but the loaded model is {lm.name!r};"
                         " experiments must use the run's own model (capture a new run first)")
    if lm.n_layers != entry.run.n_layers:
        raise InputError(f"the loaded model has {lm.n_layers} layers, the run {entry.run.n_layers}")


def run_truncation(lm, entry, depths: list[int], mode: str, *, sweep: bool, progress=None) -> dict:
    """compare / sweep on the entry's image + prompt; stores the result JSON in entry.extras."""
    from ..experiments import compare as C

    check_model_matches(lm, entry)
    image, prompt, n_new = _run_args(entry)
    from ..findings import run_truth

    truth = run_truth(entry.run)
    if sweep:
        res = C.sweep(lm, image, prompt, mode=mode, max_new_tokens=n_new, progress=progress, store="none",
                      record_attention=False, keep_runs=False, truth=truth)
        sweeps = dict(entry.sweeps)                # every mode's sweep is kept: none overwrites another
        sweeps[mode] = res.to_json()
        entry.extras.pop("sweep", None)            # (an older single sweep is now under its mode)
        entry.extras["sweeps"] = sweeps
        entry.extras["last_sweep_mode"] = mode
        entry.extras.pop("compare", None)          # the sweep's table shows every depth
    else:
        res = C.compare(lm, image, prompt, depths, mode=mode, max_new_tokens=n_new, progress=progress, store="none",
                        record_attention=False, keep_runs=False, truth=truth)
        entry.extras["compare"] = res.to_json()
    return res.to_json()


def result_rows(result: dict) -> list[dict]:
    rows = [{"label": "baseline (no truncation)", "tokens": list(result.get("baseline_tokens", [])),
             "kl": None, "kept": None, "correct": result.get("baseline_correct")}]
    L = result.get("n_layers")
    for d in result.get("depths", []):
        lab = f"depth {d['depth']}" + (" (= L, baseline depth)" if d["depth"] == L else "")
        kl = d.get("output_kl")
        rows.append({"label": lab, "tokens": list(d.get("tokens", [])),
                     "kl": d.get("first_token_kl") if kl is None or kl != kl else kl,
                     "kept": d.get("answer_kept"), "div": d.get("first_divergence"), "correct": d.get("correct")})
    return rows


def _result_obj(result: dict):
    from ..experiments.compare import TruncationResult

    return TruncationResult.from_json(result)


def truncation_views(entry) -> tuple[str, object, object]:
    """(side-by-side HTML, sweep figure, reasoning-perturbation figure) of the stored results."""
    comp, sweeps = entry.extras.get("compare"), entry.sweeps
    sweep = sweeps.get(entry.extras.get("last_sweep_mode")) or entry.sweep or next(iter(sweeps.values()), None)
    shown = comp or sweep
    if shown:
        head = (f"<p><b>{'Comparison' if comp else 'Sweep'}</b> · mode <code>{shown.get('mode')}</code> · "
                f"baseline answer <code>{shown.get('baseline_answer', '')}</code> · {shown.get('seconds', 0):.1f} s</p>")
        gens = head + generations_table(result_rows(shown))
    else:
        gens = note("No truncation results yet: pick depths and a mode, then Compare (needs the model).")
    if sweeps:
        fig = entry.derived.get(("fig_sweeps", content_key(sweeps)),
                                lambda: _figure_of(sweeps, fig_sweep_modes, "Truncation sweeps"))
    else:
        fig = message_figure("No sweep for this run yet: choose 'all (sweep)' and Compare.", "Truncation sweep")
    return gens, fig, perturbation_figure(entry, sweep or comp)


def has_trace(result: dict | None) -> bool:
    sep = (result or {}).get("separator") or "answer:"
    return bool(result) and sep.lower() in str(result.get("baseline_text", "")).lower()


def perturbation_figure(entry, result: dict | None):
    title = "Reasoning-trace perturbation"
    if not result:
        return message_figure("Run a comparison or sweep first; for prompts whose answer has a reasoning trace.", title)
    if not has_trace(result):
        return message_figure("The baseline answer has no reasoning trace (no 'answer:' in it); "
                              "try a reasoning prompt.", title)
    return entry.derived.get(("fig_pert", content_key(result)),
                             lambda: _figure_of(result, fig_reasoning_perturbation, title))


def _figure_of(result: dict, fig, title: str):
    """A stored result's figure: the result object read back, and what the figure states computed here."""
    try:
        if fig is fig_sweep_modes:
            return figure(fig, {m: _result_obj(r) for m, r in result.items()}, title=title,
                          **sweep_statements(result))
        obj = _result_obj(result)
    except Exception as e:
        return message_figure(f"stored result is not readable: {e}", title)
    if fig is fig_reasoning_perturbation:
        obj = reasoning_perturbation(obj)
    return figure(fig, obj, title=title)


#: extras key -> (experiment, result class or None for a plain dict, figure, button title)
EXPERIMENTS = {
    "substitution": (substitution_matrix, SubstitutionResult, fig_substitution_matrix, "Substitution matrix"),
    "layer_skip": (layer_skip_scan, SkipScanResult, fig_layer_skip, "Layer-skip scan"),
    "compute": (compute_tradeoff, None, fig_compute_tradeoff, "Measure compute"),
    "encoder_grid": (encoder_decoder_grid, EncoderGrid, fig_encoder_grid, "Encoder x decoder grid"),
}


def run_experiment(lm, entry, key: str, progress=None) -> dict:
    """Run the experiment ``key`` on the entry's image + prompt; keep its JSON in extras[key]."""
    fn = EXPERIMENTS[key][0]
    check_model_matches(lm, entry)
    image, prompt, n_new = _run_args(entry)
    if key == "compute":
        if progress:
            progress(0, 1, "timing prefill and decoding per depth")
        res = fn(lm, image, prompt, measure=True, repeats=3)
    else:
        res = fn(lm, image, prompt, max_new_tokens=n_new, progress=progress)
    entry.extras[key] = res.to_json() if hasattr(res, "to_json") else res
    return entry.extras[key]


def run_stages(lm, entry, progress=None) -> dict:
    """Knockout windows and the three stages of the entry's input; kept in extras["stages"]."""
    from ..experiments.stages import causal_stages, stages_undefined

    check_model_matches(lm, entry)
    why = stages_undefined(lm)
    if why:                                   # said where the stages would be, never a failed analysis
        entry.extras["stages"] = {"undefined": why}
        return entry.extras["stages"]
    image, prompt, n_new = _run_args(entry)
    entry.extras["stages"] = causal_stages(lm, image, prompt, max_new_tokens=n_new, progress=progress).to_json()
    return entry.extras["stages"]


def experiment_figure(entry, key: str):
    _fn, cls, fig, title = EXPERIMENTS[key]
    res = entry.extras.get(key)
    if res is None:
        return message_figure(f"No {title.lower()} for this run yet: press '{title}' (needs the run's model).", title)
    try:
        obj = cls(**res) if cls is not None else res
    except Exception as e:
        return message_figure(f"stored {title.lower()} is not readable ({e})", title)
    return entry.derived.get((fig.__name__, content_key(res)), lambda: figure(fig, obj, title=title))


# ---- token pruning (Compute tab) ---------------------------------------------------------------------

def run_pruning(lm, entry, methods_text: str, progress=None) -> dict:
    """Pruning methods compared on the entry's image + prompt; kept in extras["pruning"]."""
    from ..experiments.pruning import compare_pruning
    from ..experiments.variants import parse_variants
    from ..findings import run_truth

    check_model_matches(lm, entry)
    methods = parse_variants(lm, methods=methods_text or "default", stage_labels=stage_labels(entry)).methods
    image, prompt, n_new = _run_args(entry)
    res = compare_pruning(lm, image, prompt, methods, max_new_tokens=n_new, truth=run_truth(entry.run),
                          latency=True, repeats=2, progress=progress)
    entry.extras["pruning"] = res.to_json()
    return entry.extras["pruning"]


def stage_labels(entry) -> list[str] | None:
    """The run's causal stage labels per layer, when the three stages were found for it."""
    return (entry.extras.get("stages") or {}).get("labels") or None


def pruning_methods(entry) -> list[str]:
    return [m["name"] for m in (entry.extras.get("pruning") or {}).get("methods", []) if m["name"] != "baseline"]


def pruning_markdown(entry) -> str:
    res = entry.extras.get("pruning")
    if not res:
        return ("No pruning comparison for this run yet: write the methods (or keep `default`) and press "
                "**Compare pruning methods** (needs the run's model).")
    from ..experiments.method_cell import MethodResult
    from ..experiments.pruning import PruningComparison

    obj = PruningComparison(**{**res, "methods": [MethodResult(**m) for m in res["methods"]]})
    head = (f"**Token pruning** on this input · baseline `{obj.baseline_text}` · {obj.n_image} image tokens · "
            f"{obj.seconds:.1f} s. FLOPs and KV saved are counted from what each method computes (a method that "
            "loses the answer saves nothing worth having; masks save nothing). **keep** is the fraction of image tokens "
            "kept; the FastV paper's R is the fraction dropped (write `drop=0.75` for its R = 75 %). FastV's ranking is "
            "read once at the prefill (default; the pruned KV cache is reused for every generated token -- the saving) "
            "or, written `fastv:K:R:step`, anew at every step from the newest token as FastV's released evaluation "
            "runs it (each step recomputes the pruned layers: it costs more than no pruning).")
    return head + "\n\n" + obj.markdown()


def pruning_figure(entry, method: str | None):
    title = "Image tokens kept per layer"
    res = entry.extras.get("pruning")
    if not res:
        return message_figure("Compare pruning methods first; then pick one to see which image tokens it keeps.", title)
    by_name = {m["name"]: m for m in res["methods"] if m["name"] != "baseline"}
    if not by_name:
        return message_figure("The comparison holds no pruning method.", title)
    name = method if method in by_name else next(iter(by_name))
    m = by_name[name]
    if not m["image_kept"]:                      # a smaller input (downsampling): no subset of these tokens
        return message_figure(f"{name}: {m['description']} -- it keeps no subset of this run's image tokens", title)
    return entry.derived.get(("fig_kept", content_key(m)),
                             lambda: figure(fig_kept_tokens, entry.run, kept=m["image_kept"], name=name, title=title))


# ---- heatmaps checked against causal effects (Heatmaps tab) ------------------------------------------

def run_map_check(lm, entry, kind: str, layer: int, query: int) -> dict:
    """The deletion / insertion check of the map drawn in the Heatmaps tab (attention of token
    ``query``, or LLaVA-CAM, at ``layer``) on the entry's image + prompt; every check of the entry is
    kept in extras["map_checks"] (name -> MapCheck JSON). The cuts are cached per entry, so a second
    map of the same run re-uses the random orders."""
    from ..experiments.map_check import MapScorer
    from ..experiments.map_report import map_values
    from . import run_views

    check_model_matches(lm, entry)
    cam = run_views.cam_array(entry, lm) if kind == "LLaVA-CAM" else None      # the tab's cached CAM
    values = map_values(lm, entry.run, kind, layer, query_index=query, cam=cam)
    name = (f"attention of token {query}, layer {layer}" if kind == "attention" and query
            else f"{kind}, layer {layer}")
    image, prompt, n_new = _run_args(entry)
    scorer = entry.derived.get(("map scorer", lm.name), lambda: MapScorer(lm, image, prompt, max_new_tokens=n_new))
    res = scorer.check(values, name)
    entry.extras.setdefault("map_checks", {})[name] = res.to_json()
    return res.to_json()


def map_check_outputs(entry, name: str | None):
    """(markdown of the checks, their curves) for the Heatmaps tab; ``name`` first."""
    from ..experiments.map_check import MapCheck
    from ..figures.maps import fig_map_check

    got = entry.extras.get("map_checks") or {}
    if not got:
        return ("_Check the map above against causal effects: its top image tokens are cut (deletion) or kept"
                " alone (insertion), next to random orders._", message_figure("no map checked yet", "Map check"))
    checks = [MapCheck(**d) for d in got.values()]
    checks.sort(key=lambda c: c.name != name)
    md = "\n".join(f"- **causal**: {c.statement}" for c in checks)
    return md, figure(fig_map_check, checks, title=None)
