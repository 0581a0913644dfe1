"""Event handlers of the dashboard (the only place, with layout.py, that speaks gradio).

Every handler takes the per-browser-session state ``sess`` (a small dict of run ids, never
tensors) and returns new values; runs live in the server-side :class:`RunStore`. User
errors (InputError, RunFormatError, a missing file) become ``gr.Error`` with their message;
anything unexpected is logged and shown as an error too, and the server keeps serving.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr

from ..errors import InputError
from ..run import RunFormatError
from . import experiment_views, panels, run_views
from .markup import note, token_strip
from .inputs import SceneBook, load_examples, prompt_choices, random_scene, truth_markdown
from .exports import ExportDirs
from .handler import handler
from .model_holder import ModelHolder, resolve_model_name
from .store import RunsDir, RunStore
from .tabs.attention import AttentionTab
from .tabs.compute import ComputeTab
from .tabs.dynamics import DynamicsTab
from .tabs.heatmaps import HeatmapsTab
from .tabs.study import DATASETS_DIR, StudyTab
from .tabs.substitution import SubstitutionTab
from .tabs.truncation import TruncationTab

log = logging.getLogger("vlmlens.ui")
TABS = ("overview", "heatmaps", "dynamics", "attention", "truncation", "substitution", "compute", "study", "runs")


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


class Dashboard(HeatmapsTab, DynamicsTab, AttentionTab, TruncationTab, SubstitutionTab, ComputeTab, StudyTab):
    """State shared by every session: the model holder, the run store, the runs folder.
    The input panel, runs and overview handlers are here; each tab's in its module of ``ui/tabs/``."""

    def __init__(self, *, model: str | None = "tiny-shapes", device: str = "auto", dtype: str = "auto",
                 runs_dir=None, trust_remote_code: bool = False, no_model: bool = False,
                 default_run: str | None = None, store_capacity: int = 64, loader=None, start_loading: bool = True,
                 time_limit: float | None = 120.0, max_image_side: int = 1344, studies=None, adapter=None,
                 datasets=None, study_time_limit: float | None = 600.0, max_image_tokens: int | None = 16384):
        name, why = resolve_model_name(model, no_model)
        self.holder = ModelHolder(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                  loader=loader, off_reason=why, adapter=adapter)
        self.store = RunStore(store_capacity)
        self.runs = RunsDir(runs_dir)
        self.studies_root = Path(studies) if studies else None    # the Study tab opens / writes studies under it only
        self.datasets_root = Path(datasets) if datasets else DATASETS_DIR   # and runs datasets from here only
        self.study_time_limit = study_time_limit
        self.examples = load_examples()
        self.scenes = SceneBook()
        self.export_dirs = ExportDirs()
        self.time_limit = time_limit
        self.max_image_side = int(max_image_side)
        self.max_image_tokens = max_image_tokens     # one request's image / video tokens (a video's frames add up)
        for ex in self.examples:
            self.scenes.add_file(ex["file"], ex.get("truth"), ex.get("seed"), ex.get("prompts"))
        self.timings: dict[str, deque] = defaultdict(lambda: deque(maxlen=500))
        self.default_run, self.default_layers = None, 2
        for name in ([default_run] if default_run else []) + self.runs.preferred_order(model=self.holder.name):
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
            self._warm_views(entry)
        except Exception:  # only a warm-up
            log.exception("warm-up failed")

    def _warm_views(self, entry) -> None:
        """Draw, in the background, what every tab shows of a run that needs no model (each figure is kept in
        the run's cache), so a tab opened later finds its figures drawn. Once per run: the run's cache holds
        the mark, whichever of its entries (sessions) asked first."""
        if entry.derived.peek("views_warmed"):
            return
        entry.derived.get("views_warmed", lambda: True)
        panels.safe(lambda: run_views.attention_figures(entry))       # the Overview's figure, then the slowest
        panels.safe(lambda: run_views.dynamics_figures(entry))
        panels.safe(lambda: run_views.embedding_figure(entry, "pca"))             # the Dynamics tab's token map
        self._prefetch_layers(entry, 0, "attention")
        last = entry.run.n_layers - 1
        for draw in (lambda: run_views.heatmap_grid(entry, 0, "attention"), lambda: run_views.logit_lens_figures(entry),
                     lambda: run_views.encoder_decoder_figure(entry), lambda: experiment_views.truncation_views(entry),
                     lambda: run_views.head_maps_figure(entry, last), lambda: run_views.frames_figure(entry),
                     lambda: experiment_views.experiment_figure(entry, "compute"),
                     lambda: self._pruning_outputs(entry, None)):
            panels.safe(draw)

    def _prefetch_layers(self, entry, query: int, kind: str) -> None:
        """Draw every layer's heatmap for (query, kind) in the background, so the slider finds
        them in the cache."""
        for layer in range(entry.run.n_layers):
            run_views.heatmap_layer(entry, layer, query, kind)

    # ---- helpers ------------------------------------------------------------------------------
    def entry(self, sess):
        return self.store.get((sess or {}).get("current"))

    def _adopt(self, sess, entry) -> dict:
        sess = with_sid(sess)
        mine = [m for m in sess.get("mine", []) if self.store.has(m[1])]
        mine.append([entry.label, entry.id])
        sess.update(current=entry.id, mine=mine[-20:])
        self._prefetch.submit(panels.safe, lambda: self._warm_views(entry))   # a run shown: its views drawn ahead
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

    @handler("image_uploaded")
    def image_uploaded(self, image):
        """A new image in the input box: the ground truth and example prompts of its scene when it is one the
        dashboard knows (by its pixels), else none -- never the previous example's."""
        from ..images import image_sha256, load_image

        scene = None
        if image is not None:
            try:
                scene = self.scenes.get(image_sha256(load_image(image)[0]))
            except InputError:            # an unreadable upload is named when it is run
                scene = None
        if scene is None:
            return gr.Dropdown(choices=prompt_choices(None), value=None), truth_markdown(None)
        return (gr.Dropdown(choices=prompt_choices(scene["prompts"]), value=None),
                truth_markdown(scene["truth"], scene["seed"]))

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
        return self._capture(rgb, prompt, max_new_tokens, sess, progress, [x for x in (conv, shrunk) if x])

    @handler("capture_video")
    def capture_video(self, video, frames, prompt, max_new_tokens, sess, progress=gr.Progress()):
        """Capture a new run from a video file (frames sampled evenly; the Qwen-VL families)."""
        from ..video import load_video

        if not video:
            raise InputError("no video: upload a video file (mp4, webm, mov, mkv, avi)")
        try:
            v = load_video(video, frames=int(frames) if isinstance(frames, float) and float(frames).is_integer()
                           else frames)
        except InputError as e:         # name the upload, not the server's temporary copy of it
            raise InputError(str(e).replace(str(Path(video)), Path(video).name)) from None
        return self._capture(v, prompt, max_new_tokens, sess, progress, [v.note] if v.note else [])

    def _capture(self, source, prompt, max_new_tokens, sess, progress, notes: list):
        """One capture of an image (bounded already) or a Video and what the dashboard shows of it
        (experiments.explore); the overview of it."""
        from ..capture import check_max_new_tokens, check_prompt
        from ..experiments.explore import explore

        prompt = check_prompt(prompt)
        n = check_max_new_tokens(int(max_new_tokens) if isinstance(max_new_tokens, float) and
                                 float(max_new_tokens).is_integer() else max_new_tokens)
        progress(0.05, desc="waiting for the model")
        with self.holder.use() as lm:
            ex = explore(lm, source, prompt, n, time_limit=self.time_limit, max_image_tokens=self.max_image_tokens,
                         notes=notes, progress=lambda fraction, what: progress(fraction, desc=what))
        task = self.scenes.task(ex.run.meta.get("image_sha256"), prompt)
        if task:
            ex.run.meta["task"] = task
        sess = with_sid(sess)
        what = "video" if ex.video is not None else "capture"
        entry = self.store.add(ex.run, label=f"{what} {time.strftime('%H:%M:%S')}: {prompt[:40]}", owner=sess["sid"],
                               video=ex.video, extras=ex.extras)
        if ex.notes:
            gr.Info(f"{'video' if ex.video is not None else 'image'} note: {'; '.join(ex.notes)}")
        for w in ex.warnings:
            gr.Warning(w)
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
            o_label, o_sweep = other, None                  # its sweeps are in o_extras, one per mode
        return (panels.comparison_markdown(entry, o_run, o_label, o_sweep, o_extras),
                run_views.compare_attention(entry.run, o_run, o_label), run_views.compare_dynamics(entry.run, o_run, o_label))

    @handler("downloads")
    def downloads(self, sess):
        from . import exports

        entry = self.entry(sess)
        figs = [f for f in self._all_figures(entry) if f is not None]
        d = self.export_dirs.new()
        return (str(exports.run_zip(entry, d)), str(exports.metrics_csv(entry, d)),
                str(exports.figures_html(entry, figs, d)))

    def overview_figure(self, sess, active="overview"):
        """The Overview's figure: where the image is read (the Attention tab's flow figure, one drawing per
        run); on the first screen it also brings the page's plotting library in while the reader reads."""
        if active != "overview" or not self.store.has((sess or {}).get("current")):
            return gr.skip()
        return run_views.attention_figures(self.entry(sess))[0]

    def downloads_if_shown(self, sess, active="runs"):
        """The downloads of the run now shown, when the Runs tab (which offers them) is the one open
        (nothing to do without a run: an empty runs folder)."""
        if active != "runs" or not self.store.has((sess or {}).get("current")):
            return gr.skip(), gr.skip(), gr.skip()
        return self.downloads(sess)

    def _all_figures(self, entry):
        lm = self.lm_for(entry)
        out = []
        if "attention_maps" in entry.run.arrays:
            out += [run_views.heatmap_grid(entry, 0, "attention", lm)]
        out += list(run_views.logit_lens_figures(entry)) + list(run_views.dynamics_figures(entry))
        out += list(run_views.attention_figures(entry)) + list(experiment_views.truncation_views(entry)[1:])
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
                gr.Dropdown(choices=experiment_views.depth_choices(L), value=["0", str(L // 2)], multiselect=True),
                gr.Dropdown(choices=mine, value=entry.id), run.image, self.scenes.truth_markdown_for(run),
                gr.skip() if run.meta.get("video") else run.image, run.prompt, n_new,   # (a video stays in its box)
                gr.Dropdown(choices=[(f"this session: {m[0]}", m[1]) for m in mine if m[1] != entry.id]
                            + [(n, n) for n in self.runs.preferred_order()], value=None))
