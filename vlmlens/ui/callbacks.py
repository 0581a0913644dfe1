"""Event handlers of the dashboard (the only place, with layout.py, that speaks gradio).

Every handler takes the per-browser-session state ``sess`` (a small dict of run ids, never
tensors) and returns new values; runs live in the server-side :class:`RunStore`. User
errors (InputError, RunFormatError, a missing file) become ``gr.Error`` with their message;
anything unexpected is logged and shown as an error too, and the server keeps serving.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor

import gradio as gr

from ..errors import InputError
from ..run import RunFormatError
from . import panels, views, xviews
from .html import note, token_strip
from .inputs import SceneBook, load_examples, prompt_choices, random_scene, truth_markdown
from .model import ModelHolder, resolve_model_name
from .panels import Missing
from .exports import ExportDirs
from .store import RunsDir, RunStore

log = logging.getLogger("vlmlens.ui")
USER_ERRORS = (InputError, RunFormatError, FileNotFoundError, FileExistsError, Missing)
AUTO_STAGES_MAX_LAYERS = 12   # captures of models this shallow get their knockout stages at once
TABS = ("overview", "heatmaps", "dynamics", "attention", "truncation", "substitution", "compute", "runs")


def new_session() -> dict:
    """A browser session's state (the layout's gr.State default: copied per session, so the
    session id is added on the session's first run, see :func:`with_sid`)."""
    return {"current": None, "mine": []}


def bounded_image(rgb, max_side: int):
    """(image, note): an upload larger than ``max_side`` pixels on its long side is scaled down
    (Lanczos) *before* the model sees it, so the run stores — and LLaVA-CAM re-runs on — exactly
    the model's input; a 4000x3000 photo otherwise costs ~7x the capture time and a 5 MB
    image.png for what the processors shrink to a few hundred pixels anyway. The note says so."""
    from PIL import Image

    w, h = rgb.size
    if max(w, h) <= max_side:
        return rgb, None
    s = max_side / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return rgb.resize(size, Image.LANCZOS), f"scaled down from {w}x{h} to {size[0]}x{size[1]} before the model saw it"


def with_sid(sess) -> dict:
    """``sess`` with a session id (a new one the first time): the store's fair-share owner."""
    import uuid

    sess = dict(sess or new_session())
    sess.setdefault("sid", uuid.uuid4().hex)
    return sess


def handler(name: str):
    """Turn user errors into gr.Error, log the rest, and time the call (server-side)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as e:
                msg = str(e) if not isinstance(e, KeyError) else str(e.args[0])
                raise gr.Error(msg, print_exception=False) from None
            except Exception as e:
                log.exception("handler %s failed", name)
                raise gr.Error(f"{name} failed: {type(e).__name__}: {e}") from None
            finally:
                self.timings[name].append(time.perf_counter() - t0)
        return wrapper
    return deco


class Dashboard:
    """State shared by every session: the model holder, the run store, the runs folder."""

    def __init__(self, *, model: str | None = "tiny-shapes", device: str = "auto", dtype: str = "auto",
                 runs_dir=None, trust_remote_code: bool = False, no_model: bool = False,
                 default_run: str | None = None, store_capacity: int = 64, loader=None, start_loading: bool = True,
                 time_limit: float | None = 120.0, max_image_side: int = 1344):
        name, why = resolve_model_name(model, no_model)
        self.holder = ModelHolder(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                  loader=loader, off_reason=why)
        self.store = RunStore(store_capacity)
        self.runs = RunsDir(runs_dir)
        self.examples = load_examples()
        self.scenes = SceneBook()
        self.export_dirs = ExportDirs()
        self.time_limit = time_limit
        self.max_image_side = int(max_image_side)
        for ex in self.examples:
            self.scenes.add_file(ex["file"], ex.get("truth"), ex.get("seed"), ex.get("prompts"))
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=500))
        self.default_run, self.default_layers = None, 2
        for name in ([default_run] if default_run else []) + self.runs.preferred_order():
            try:  # warm the shared copy so the first page opens it at once
                self.default_layers = self.runs.open(name)[0].n_layers
                self.default_run = name
                break
            except (RunFormatError, InputError, FileNotFoundError) as e:
                log.warning("run %s cannot be the default run: %s", name, e)
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlens-prefetch")
        if self.default_run:  # warm plotly's validators and the default run's heatmaps off the request path
            self._prefetch.submit(self._warm_default)
        if start_loading:
            self.holder.start()

    def _warm_default(self) -> None:
        try:
            run, derived, extras = self.runs.open(self.default_run)
            entry = self.store.add(run, label=self.default_run, source=f"saved:{self.default_run}",
                                   derived=derived, extras=extras)
            self._prefetch_layers(entry, 0, "attention")
        except Exception:  # only a warm-up
            log.exception("warm-up failed")

    def _prefetch_layers(self, entry, query: int, kind: str) -> None:
        """Draw every layer's heatmap for (query, kind) in the background, so the slider finds
        them in the cache."""
        for layer in range(entry.run.n_layers):
            views.heatmap_layer(entry, layer, query, kind)

    # ---- helpers ------------------------------------------------------------------------------
    def entry(self, sess):
        return self.store.get((sess or {}).get("current"))

    def _adopt(self, sess, entry) -> dict:
        sess = with_sid(sess)
        mine = [m for m in sess.get("mine", []) if self.store.has(m[1])]
        mine.append([entry.label, entry.id])
        sess.update(current=entry.id, mine=mine[-20:])
        return sess

    def _overview(self, sess, entry):
        return (sess, panels.run_info(entry), panels.generation_markdown(entry), token_strip(entry.run),
                panels.headline_markdown(entry))

    def lm_for(self, entry):
        """The loaded model if it is the run's model (for LLaVA-CAM), else None; never waits."""
        lm = self.holder.lm
        return lm if lm is not None and lm.name == entry.run.meta.get("model") else None

    # ---- input panel --------------------------------------------------------------------------
    @handler("model_status")
    def model_status(self):
        done = self.holder.state in ("ready", "failed", "off")
        return self.holder.status_markdown(), gr.Timer(active=not done)

    @handler("pick_example")
    def pick_example(self, prompt, evt: gr.SelectData):
        ex = self.examples[int(evt.index)]
        self.scenes.add_file(ex["file"], ex.get("truth"), ex.get("seed"), ex.get("prompts"))
        choices = prompt_choices(ex.get("prompts"))
        first = choices[0][1] if choices and not (prompt or "").strip() else gr.skip()
        return (ex["file"], gr.Dropdown(choices=choices, value=None), truth_markdown(ex.get("truth"), ex.get("seed")),
                first)

    @handler("random_scene")
    def new_scene(self, seed=None):
        seed = None if seed in (None, "", 0) else int(seed)
        image, truth, prompts = random_scene(seed)
        self.scenes.add_image(image, truth, truth.get("seed"), prompts)
        return image, gr.Dropdown(choices=prompt_choices(prompts), value=None), truth_markdown(truth)

    @handler("pick_prompt")
    def pick_prompt(self, choice):
        return gr.skip() if not choice else choice

    @handler("capture")
    def capture(self, image, prompt, max_new_tokens, sess, progress=gr.Progress()):
        """Capture a new run from the input panel; returns the overview of it."""
        from ..capture import capture, check_max_new_tokens, check_prompt
        from ..images import load_image

        if image is None:
            raise InputError("no image: upload one, pick an example, or make a random scene")
        try:
            rgb, conv = load_image(image)
        except InputError as e:         # name the upload, not the server's temporary copy of it
            if isinstance(image, str):
                raise InputError(str(e).replace(str(Path(image)), Path(image).name)) from None
            raise
        rgb, shrunk = bounded_image(rgb, self.max_image_side)
        prompt = check_prompt(prompt)
        n = check_max_new_tokens(int(max_new_tokens) if isinstance(max_new_tokens, float) and
                                 float(max_new_tokens).is_integer() else max_new_tokens)
        progress(0.05, desc="waiting for the model")
        with self.holder.use() as lm:
            progress(0.2, desc=f"capturing {lm.n_layers} layers")
            run = capture(lm, rgb, prompt, max_new_tokens=n, time_limit=self.time_limit)
            notes = [x for x in (conv, shrunk) if x]
            if notes:
                run.meta["image_note"] = "; ".join(notes)
            if lm.name == "tiny-shapes":
                from ..tiny.world_check import shapes_world_check

                why = shapes_world_check(rgb)
                if why:
                    run.meta["out_of_world"] = why
            if run.meta.get("generation", {}).get("stop_reason") == "time limit":
                gr.Warning(f"generation stopped at the {self.time_limit:.0f} s time limit of one request "
                           f"({len(run.generated_tokens)} tokens)")
            task = self.scenes.task(run.meta.get("image_sha256"), prompt)
            if task:
                run.meta["task"] = task
            progress(0.7, desc="logit lens and LLaVA-CAM")
            from ..cached import add_analysis_arrays

            add_analysis_arrays(lm, run)
            sess = with_sid(sess)
            entry = self.store.add(run, label=f"capture {time.strftime('%H:%M:%S')}: {prompt[:40]}",
                                   owner=sess["sid"])
            panels.safe(lambda: xviews.theory_compute(lm, entry))
            if lm.n_layers <= AUTO_STAGES_MAX_LAYERS:   # 3L + 1 teacher-forced forwards: cheap on small models
                progress(0.8, desc="knockout windows (three stages)")
                panels.safe(lambda: xviews.run_stages(lm, entry))
        if conv or shrunk:
            gr.Info(f"image note: {'; '.join(x for x in (conv, shrunk) if x)}")
        if run.meta.get("out_of_world"):
            gr.Warning(f"this image does not look like the shapes world tiny-shapes was trained on: "
                       f"{run.meta['out_of_world']}")
        if run.meta.get("unknown_words"):
            gr.Warning(f"{lm.name} does not know: {', '.join(run.meta['unknown_words'])} (read as its unknown token)")
        progress(0.9, desc="summarising")
        return self._overview(self._adopt(sess, entry), entry)

    # ---- runs ---------------------------------------------------------------------------------
    @handler("list_runs")
    def list_runs(self):
        """Names of the saved runs (and a table of them for the Runs tab)."""
        names = self.runs.preferred_order()
        return gr.Dropdown(choices=names, value=names[0] if names else None), names, self.runs.table_markdown()

    @handler("load_run")
    def load_run(self, name, sess):
        """Open a saved run by name (validated); returns the same overview as capture."""
        if not name:
            raise InputError("pick a run from the list first")
        run, derived, extras = self.runs.open(name)
        sess = with_sid(sess)
        entry = self.store.add(run, label=name, source=f"saved:{name}", derived=derived, extras=extras,
                               owner=sess["sid"])
        return self._overview(self._adopt(sess, entry), entry)

    @handler("open_default")
    def open_default(self, sess, request: gr.Request = None):
        """On page load: the run named in the page's ``?run=NAME`` (a shareable link to a saved
        run), else the default saved run, so the dashboard shows something at once."""
        if (sess or {}).get("current") and self.store.has(sess["current"]):
            return self._overview(sess, self.entry(sess))
        wanted = (dict(request.query_params).get("run") if request is not None else None) or None
        if wanted:
            return self.load_run(wanted, sess)
        if not self.default_run:
            empty = note("No run yet: pick an example image and a prompt, then Run.")
            return sess or new_session(), {}, "", empty, ""
        return self.load_run(self.default_run, sess)

    @handler("switch_run")
    def switch_run(self, run_id, sess):
        ids = {m[1] for m in (sess or {}).get("mine", [])}
        if run_id not in ids:
            raise InputError("that run is not one of this session's runs")
        sess = dict(sess, current=run_id)
        return self._overview(sess, self.entry(sess))

    @handler("save_run")
    def save_run(self, name, sess):
        """Save the current run under ``name`` (spaces become dashes, and the message says so)."""
        entry = self.entry(sess)
        typed = (name or "").strip()
        clean = "-".join(typed.split())
        dest = self.runs.save(clean, entry.run, entry.extras)
        names = self.runs.preferred_order()
        changed = f" (spaces became dashes: `{typed}` → `{dest.name}`)" if clean != typed else ""
        return (f"Saved as `{dest.name}` in `{self.runs.path}`{changed}. Link: `?run={dest.name}`",
                gr.Dropdown(choices=names, value=dest.name), self.runs.table_markdown())

    @handler("compare_runs")
    def compare_runs(self, sess, other):
        """The current run next to another (one of this session's runs by id, or a saved run by
        name): prompts, answers and headlines side by side; attention flow and geometry overlaid
        (the other run dashed)."""
        entry = self.entry(sess)
        if not other:
            raise InputError("pick the other run first (a saved run, or one of this session's)")
        mine = {m[1] for m in (sess or {}).get("mine", [])}
        if other in mine and self.store.has(other):
            o_entry = self.store.get(other)
            o_run, o_label, o_sweep, o_extras = o_entry.run, o_entry.label, o_entry.sweep, o_entry.extras
        else:
            o_run, _derived, o_extras = self.runs.open(other)
            o_label, o_sweep = other, o_extras.get("sweep")
        return (panels.comparison_markdown(entry, o_run, o_label, o_sweep, o_extras),
                views.compare_attention(entry.run, o_run, o_label), views.compare_dynamics(entry.run, o_run, o_label))

    @handler("downloads")
    def downloads(self, sess):
        from . import exports

        entry = self.entry(sess)
        figs = [f for f in self._all_figures(entry) if f is not None]
        d = self.export_dirs.new()
        return (str(exports.run_zip(entry, d)), str(exports.metrics_csv(entry, d)),
                str(exports.figures_html(entry, figs, d)))

    def _all_figures(self, entry):
        lm = self.lm_for(entry)
        out = []
        if "attention_maps" in entry.run.arrays:
            out += [views.heatmap_grid(entry, 0, "attention", lm)]
        out += list(views.logit_lens_figures(entry)) + list(views.dynamics_figures(entry))
        out += list(views.attention_figures(entry)) + list(xviews.truncation_views(entry)[1:])
        return out

    # ---- controls that follow the run ---------------------------------------------------------
    @handler("sync_controls")
    def sync_controls(self, sess, layer):
        if not self.store.has((sess or {}).get("current")):  # e.g. an empty runs folder at page load
            return tuple(gr.skip() for _ in range(10))
        entry = self.entry(sess)
        run = entry.run
        L = run.n_layers
        layer = int(min(max(int(layer or 0), 0), L - 1))  # keep the layer when it exists in the new run
        mine = [(m[0], m[1]) for m in sess.get("mine", []) if self.store.has(m[1])]
        gen = run.meta.get("generation") or {}
        n_new = int(min(max(int(gen.get("max_new_tokens") or 12), 1), 256))
        # the input panel shows the run's own image, prompt and token budget: Run re-runs it as it is
        return (gr.Slider(minimum=0, maximum=L - 1, value=layer, step=1),
                gr.Dropdown(choices=panels.query_choices(run), value=0),
                gr.Dropdown(choices=xviews.depth_choices(L), value=["0", str(L // 2)]),
                gr.Dropdown(choices=mine, value=entry.id), run.image, self.scenes.truth_markdown_for(run),
                run.image, run.prompt, n_new,
                gr.Dropdown(choices=[(f"this session: {m[0]}", m[1]) for m in mine if m[1] != entry.id]
                            + [(n, n) for n in self.runs.preferred_order()], value=None))

    # ---- tabs ---------------------------------------------------------------------------------
    def _cam_model(self, entry, kind):
        """For LLaVA-CAM of a run that does not hold it: compute it once, under the model lock,
        into the entry's cache. Returns None (views then read the stored / cached CAM)."""
        if kind != "LLaVA-CAM" or "llava_cam" in entry.run.arrays or entry.derived.peek("llava_cam") is not None:
            return None
        lm = self.lm_for(entry)
        if lm is not None:
            with self.holder.use() as lm:
                panels.safe(lambda: views.cam_array(entry, lm))
        return None

    @staticmethod
    def _check_view(entry, layer, query, kind) -> tuple[int, int, str]:
        L = entry.run.n_layers
        try:
            layer = int(layer or 0)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"layer must be an integer 0..{L - 1}, got {layer!r}") from None
        if not 0 <= layer <= L - 1:
            raise InputError(f"layer {layer} is out of range: this run has decoder layers 0..{L - 1}")
        nq = len(panels.query_choices(entry.run))
        try:
            q = int(query or 0)
            exact = float(query or 0) == q
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"token must be an index 0..{nq - 1}, got {query!r}") from None
        if not exact:                   # 1.5 is not a token (no silent rounding)
            raise InputError(f"token must be a whole index 0..{nq - 1}, got {query!r}")
        if not 0 <= q < nq:
            raise InputError(f"token {q} is out of range: 0 = last prompt token, 1..{nq - 1} = generated tokens")
        kind = kind or "attention"
        if kind not in views.HEATMAP_KINDS:
            raise InputError(f"map must be one of {', '.join(views.HEATMAP_KINDS)}, got {kind!r}")
        return layer, q, kind

    @handler("heatmaps")
    def heatmaps(self, sess, layer, query, kind):
        """Heatmaps tab: single-layer map, small multiples, logit lens, patch lens."""
        entry = self.entry(sess)
        layer, q, kind = self._check_view(entry, layer, query, kind)
        self._cam_model(entry, kind)
        single = views.heatmap_layer(entry, layer, q, kind)
        self._prefetch.submit(panels.safe, lambda: self._prefetch_layers(entry, q, kind))
        grid = views.heatmap_grid(entry, q, kind)
        ll, pl = views.logit_lens_figures(entry)
        return single, grid, ll, pl

    @handler("heatmap_layer")
    def heatmap_layer(self, sess, layer, query, kind):
        """One layer's heatmap, drawn from stored arrays (never runs the model)."""
        entry = self.entry(sess)
        return views.heatmap_layer(entry, *self._check_view(entry, layer, query, kind))

    @handler("dynamics")
    def dynamics(self, sess, span):
        entry = self.entry(sess)
        dyn, cka, move = views.dynamics_figures(entry, span or "image")
        return move, dyn, cka, views.embedding_figure(entry, "pca")

    @handler("token_map")
    def token_map(self, sess, method, progress=gr.Progress()):
        method = method or "pca"
        if method not in ("pca", "umap"):
            raise InputError(f"token map method must be 'pca' or 'umap', got {method!r}")
        progress(0.1, desc=f"{method.upper()} of the token states (the first UMAP call compiles, ~10 s)")
        return views.embedding_figure(self.entry(sess), method)

    @handler("attention")
    def attention(self, sess):
        """Attention tab: flow (stage bands: knockout when measured, else the cosine proxy), heads, stage table,
        and each head's map at the last decoder layer (the layer picker follows the run)."""
        entry = self.entry(sess)
        L = entry.run.n_layers
        return (*views.attention_figures(entry), gr.Dropdown(choices=list(range(L)), value=L - 1),
                views.head_maps_figure(entry, L - 1))

    @handler("head_maps")
    def head_maps(self, sess, layer):
        """Each head's attention map over the image at one decoder layer (last prompt token)."""
        entry = self.entry(sess)
        L = entry.run.n_layers
        try:
            layer = int(layer)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"layer must be an integer 0..{L - 1}, got {layer!r}") from None
        if not 0 <= layer <= L - 1:
            raise InputError(f"layer {layer} is out of range: this run has decoder layers 0..{L - 1}")
        return views.head_maps_figure(entry, layer)

    @handler("find_stages")
    def find_stages(self, sess, progress=gr.Progress()):
        """The three stages from knockout windows (single layers, prefixes, suffixes) on the current run."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            xviews.run_stages(lm, entry, progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return (*views.attention_figures(entry), panels.headline_markdown(entry))

    @handler("truncation_view")
    def truncation_view(self, sess):
        return xviews.truncation_views(self.entry(sess))

    @handler("truncate")
    def truncate(self, sess, depths, mode, progress=gr.Progress()):
        """Truncation comparison at the chosen depths (or the full sweep) on the current run."""
        entry = self.entry(sess)
        ks, is_sweep = xviews.parse_depth_selection(depths, entry.run.n_layers)
        mode = mode or "drop"
        if mode not in xviews.MODES:
            raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(xviews.MODES)}")
        progress(0.02, desc="waiting for the model")

        def step(i, n, what):
            progress((i + 1) / (n + 1), desc=f"{what} ({i}/{n})")
        with self.holder.use() as lm:
            xviews.run_truncation(lm, entry, ks, mode, sweep=is_sweep, progress=step)
        gens, fig, pfig = xviews.truncation_views(entry)
        return gens, fig, pfig, panels.headline_markdown(entry)

    @handler("sweep")
    def sweep(self, sess, mode, progress=gr.Progress()):
        """The truncation sweep over every depth 0..L (API shortcut for truncate(all))."""
        return self.truncate(sess, [xviews.SWEEP_CHOICE], mode, progress=progress)

    @handler("substitution_view")
    def substitution_view(self, sess):
        entry = self.entry(sess)
        return xviews.experiment_figure(entry, "substitution"), xviews.experiment_figure(entry, "layer_skip")

    def _experiment(self, sess, key, progress):
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            xviews.run_experiment(lm, entry, key, progress=lambda i, n, what: progress(i / max(n, 1), desc=what))
        return self.substitution_view(sess)

    @handler("substitution")
    def substitution(self, sess, progress=gr.Progress()):
        """Substitution matrix (layer j reads layer i's image states) on the current run."""
        return self._experiment(sess, "substitution", progress)

    @handler("layer_skip")
    def layer_skip(self, sess, progress=gr.Progress()):
        """Layer-skip scan (skip one layer for image / all tokens) on the current run."""
        return self._experiment(sess, "layer_skip", progress)

    @handler("compute_view")
    def compute_view(self, sess):
        return xviews.experiment_figure(self.entry(sess), "compute")

    @handler("measure_compute")
    def measure_compute(self, sess, progress=gr.Progress()):
        """FLOPs / KV bytes per depth with measured prefill and decode latency (needs the model)."""
        entry = self.entry(sess)
        progress(0.02, desc="waiting for the model")
        with self.holder.use() as lm:
            xviews.run_experiment(lm, entry, "compute", progress=lambda i, n, what: progress(0.5, desc=what))
        return xviews.experiment_figure(entry, "compute"), panels.headline_markdown(entry)
