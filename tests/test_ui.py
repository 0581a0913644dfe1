"""The dashboard in-process: build_demo on a free localhost port, driven through gradio_client.

One app with ``random:llava`` (CPU, float32) and one without a model (teaching mode), both
over a temporary runs folder holding two runs made by ``make-cached-runs`` and one broken
run. Assertions read the returned figure JSON (trace counts, values) and error messages.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from vlmlens.cached import make_cached_runs  # noqa: E402
from vlmlens.ui.inputs import EXAMPLES_DIR  # noqa: E402

EXAMPLE = str(EXAMPLES_DIR / "shapes_00.png")
CACHED = ["single-color", "reasoning-more"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(value) -> dict:
    """The plotly figure dict of a gr.Plot output."""
    assert isinstance(value, dict) and value.get("type") == "plotly", value
    return json.loads(value["plot"])


def arr(v):
    """A plotly array from figure JSON: a plain list, or plotly's typed array {dtype, bdata, shape}."""
    import base64

    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(x) for x in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def heat(value) -> dict:
    """The heatmap trace of a single-layer heatmap figure (drawn over a go.Image)."""
    return next(t for t in plot(value)["data"] if t["type"] == "heatmap")


def app_error(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(*args, api_name=api_name)
    return str(e.value)


@pytest.fixture(scope="module")
def lm():
    from tests._models import random_lm

    return random_lm("llava")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, lm):
    d = tmp_path_factory.mktemp("runs")
    make_cached_runs(lm, d, only=CACHED, log=lambda *_: None)
    broken = d / "broken-run"
    shutil.copytree(d / CACHED[0], broken)
    (broken / "run.json").write_text(json.dumps({"format": "vlmlens-run", "format_version": 999}))
    return d


def _launch(demo):
    port = free_port()
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(runs_dir, lm):
    from vlmlens.ui import build_demo

    demo = build_demo("random:llava", runs_dir=runs_dir, default_run=CACHED[0], loader=lambda *a, **k: lm)
    url = _launch(demo)
    demo.dashboard.holder.wait(60)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def teaching(runs_dir):
    from vlmlens.ui import build_demo

    demo = build_demo(no_model=True, runs_dir=runs_dir, default_run=CACHED[1])
    url = _launch(demo)
    yield demo, url
    demo.close()


@pytest.fixture()
def client(app):
    return Client(app[1], verbose=False)


def test_counts_that_are_not_numbers_are_named(client):
    """#25 item 8: letters or None where a count belongs get a specific message; the next request works."""
    for bad in ("abc", None, 2.5, 10 ** 6):
        msg = app_error(client, handle_file(EXAMPLE), "What is this?", bad, api_name="/capture")
        assert "max new tokens must be a whole number in 1..256" in msg, msg
    out = client.predict(handle_file(EXAMPLE), "What is this?", 2, api_name="/capture")
    assert out


def test_endpoints_are_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for want in ("/capture", "/heatmaps", "/heatmap_layer", "/dynamics", "/attention", "/truncate", "/sweep",
                 "/list_runs", "/load_run", "/save_run", "/downloads", "/substitution", "/layer_skip", "/random_scene",
                 "/capture_video"):
        assert want in names


def test_the_api_page_describes_files_in_the_dashboards_words(client):
    """The API page says what a file input or output is, not gradio's docstring of its file class."""
    api = client.view_api(print_info=False, return_format="dict")
    text = json.dumps(api)
    assert "FileData class" not in text and "subclass of the GradioModel" not in text
    video = api["named_endpoints"]["/capture_video"]["parameters"][0]
    assert video["python_type"]["description"].startswith("A video file (.mp4")
    zip_out = api["named_endpoints"]["/downloads"]["returns"][0]
    assert zip_out["type"]["additional_description"].startswith("Run (zip): gradio_client downloads it")


def test_a_capture_shows_one_progress_bar(app):
    """#27: a capture's progress is one bar, over the generated text, not one on each overview output."""
    cfg = app[0].get_config_file()
    gen = next(c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == "vl-generation")
    deps = {d.get("api_name"): d for d in cfg["dependencies"]}
    for name in ("capture", "capture_video", "capture_submit"):
        assert deps[name]["show_progress_on"] == [gen] and len(deps[name]["outputs"]) > 1, name


def test_an_upload_shows_its_own_ground_truth_or_none(client, tmp_path):
    """#27: after an example, an uploaded photo must not keep the example's ground truth on screen."""
    _, truth = client.predict(handle_file(EXAMPLE), api_name="/image_uploaded")
    assert truth.startswith("**Ground truth**")                # a shipped scene: known by its pixels
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(photo)
    _, truth = client.predict(handle_file(str(photo)), api_name="/image_uploaded")
    assert truth == ""


def test_a_video_upload_reaches_the_model_and_is_answered(client, tmp_path):
    """The Video box's wiring: an uploaded file is read (PyAV) and handed to the loaded model, which here
    (random:llava) reads images only: the answer names the families that read video; the app keeps serving."""
    from tests.test_video import _write_video

    clip = _write_video(tmp_path / "clip.mp4", n=6)
    msg = app_error(client, handle_file(str(clip)), 4, "What happens?", 2, api_name="/capture_video")
    assert "reads images only" in msg and "qwen2_vl" in msg, msg
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 50)
    assert "cannot read video junk.mp4" in app_error(client, handle_file(str(tmp_path / "junk.mp4")), 4, "What?", 2,
                                                       api_name="/capture_video")
    assert client.predict(handle_file(EXAMPLE), "What is this?", 2, api_name="/capture")


def test_capture_then_every_tab(client, app):
    info, gen_md, strip, headline = client.predict(handle_file(EXAMPLE), "What color is the circle?", 3,
                                                   api_name="/capture")
    L = info["n_layers"]
    assert info["model"] == "random:llava" and L == 2 and info["n_image_tokens"] == 36
    assert len(info["generated_tokens"]) == 3 and info["generated_text"] in gen_md
    assert strip.count('class="vl-tok vl-generated') == 3 and "&lt;image × 36&gt;" in strip
    assert "attention cliff" in headline
    single, grid, lens, plens = client.predict(0, 0, "attention", api_name="/heatmaps")
    g = plot(grid)
    assert sum(t["type"] == "heatmap" for t in g["data"]) == L          # one small multiple per layer
    h0 = heat(single)
    h1 = heat(client.predict(1, 0, "attention", api_name="/heatmap_layer"))
    assert "layer 0" in h0["hovertemplate"] and "layer 1" in h1["hovertemplate"]
    z0, z1 = arr(h0["z"]), arr(h1["z"])
    assert z0.shape == z1.shape == (6, 6) and not np.allclose(z0, z1, equal_nan=True)   # another layer
    # one patch's numbers per layer: the attention it gets equals the heatmap's cell, and its rank
    card = client.predict("2, 3", 0, api_name="/patch_card")
    rows = [l for l in card.splitlines() if l.startswith("| ") and l[2:3].isdigit()]
    assert len(rows) == L and f"{z1[2, 3]:.4f}" in rows[1].split("|")[2]
    assert int(rows[1].split("|")[3]) == int((z1 > z1[2, 3]).sum()) + 1
    assert "<" not in "".join(r.split("|")[5] for r in rows)        # a token like "</s>" is shown, not parsed
    assert "outside the 6x6 grid" in client.predict("9, 9", 0, api_name="/patch_card")
    assert "row, col" in client.predict("2,", 0, api_name="/patch_card")
    move, dyn, cka, emb, enc_dec = client.predict("image", api_name="/dynamics")
    d = plot(dyn)
    xs = [x for t in d["data"] if t.get("name") == "image" for x in arr(t["x"])]
    assert max(xs) == L                                                 # layers 0..L
    ed = plot(enc_dec)                                                  # tower layers, then decoder layers
    assert {t.get("name") for t in ed["data"]} == {"vision tower (patches)", "decoder (image tokens)"}
    flow, heads, stages_md, head_layer, head_maps, frames = client.predict(api_name="/attention")
    assert "is an image" in json.dumps(plot(frames)["layout"].get("annotations"))   # per-slot shares: video runs only
    hm = [t for t in plot(head_maps)["data"] if t["type"] == "heatmap"]
    assert len(hm) == 4 and "head 0" in hm[0]["hovertemplate"]               # random:llava has 4 heads
    one = [t for t in plot(client.predict(0, api_name="/head_maps"))["data"] if t["type"] == "heatmap"]
    assert "layer 0 · head 0" in one[0]["hovertemplate"]
    assert "out of range" in app_error(client, 9, api_name="/head_maps")
    assert plot(flow)["data"] or plot(flow)["layout"].get("annotations")


def test_slider_redraws_from_the_run_without_the_model(client, app):
    dash = app[0].dashboard
    client.predict(handle_file(EXAMPLE), "How many objects are there?", 2, api_name="/capture")
    client.predict(0, 0, "attention", api_name="/heatmaps")
    calls = []
    real = dash.holder.use
    dash.holder.use = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for layer in (1, 0, 1):
            client.predict(layer, 0, "attention", api_name="/heatmap_layer")
    finally:
        dash.holder.use = real
    assert calls == [] and len(dash.timings["heatmap_layer"]) >= 3     # timed (BENCHMARKS), never the model


def test_truncation_compare_and_sweep(client):
    client.predict(handle_file(EXAMPLE), "What color is the circle?", 3, api_name="/capture")
    gens, sweep_fig, pert, enc, headline = client.predict(["0", "2"], "drop", api_name="/truncate")
    assert gens.count("class='vl-gen-row'") == 3                         # baseline + two depths
    assert "depth 0" in gens and "depth 2" in gens
    gens, sweep_fig, pert, enc, headline = client.predict("remove", api_name="/sweep")
    assert gens.count("class='vl-gen-row'") == 1 + 3                     # baseline + depths 0..L
    assert "sweep cliff" in headline and "no sweep for this run" not in headline
    assert "depth 2 (= L" in gens
    assert "Encoder x decoder grid" in str(plot(enc)["layout"])            # not run yet: says which button
    grid = plot(client.predict(api_name="/encoder_grid"))                   # every (tower depth, decoder depth)
    z = [t for t in grid["data"] if t["type"] == "heatmap"][0]
    assert arr(z["z"]).shape == (2, 3)                                       # random:llava: m 0..1, k 0..2


def test_runs_tab_open_save_download(client, runs_dir):
    dd, names, table = client.predict(api_name="/list_runs")
    assert set(CACHED) <= set(names) and "broken-run" in names
    assert names[:2] == CACHED                                               # index.json order first
    row = next(l for l in table.splitlines() if l.startswith(f"| {CACHED[1]} "))
    assert "| drop |" in row and f"(?run={CACHED[1]})" in row               # its sweeps (modes) and its link are listed
    info, *_ = client.predict(CACHED[1], api_name="/load_run")
    assert info["source"] == f"saved:{CACHED[1]}" and info["has_sweep"]
    saved = json.loads((runs_dir / CACHED[1] / "run.json").read_text())
    assert info["generated_text"] == saved["generated_text"]
    gens, sweep_fig, _pert, _enc = client.predict(api_name="/truncation_view")
    assert "Sweep" in gens and gens.count("class='vl-gen-row'") == 1 + info["n_layers"] + 1
    client.predict(handle_file(EXAMPLE), "Is there a red circle?", 2, api_name="/capture")
    name = f"saved-{int(time.time() * 1000)}"
    msg, _, table = client.predict(name, api_name="/save_run")
    assert f"| {name} " in table
    assert name in msg and (runs_dir / name / "arrays.safetensors").is_file()
    assert "already exists" in app_error(client, name, api_name="/save_run")
    zpath, cpath, hpath = client.predict(api_name="/downloads")
    with zipfile.ZipFile(zpath) as z:
        files = {Path(n).name for n in z.namelist()}
    assert {"run.json", "arrays.safetensors", "image.png"} <= files
    rows = list(csv.DictReader(open(cpath)))
    assert rows and {"metric", "span", "layer", "value", "mode"} == set(rows[0])          # mode: of sweep rows
    assert any(r["metric"] == "attention_share_image" for r in rows)
    assert "plotly" in Path(hpath).read_text()[:200000].lower()


def test_bad_inputs_are_messages_and_the_server_keeps_serving(client, tmp_path):
    assert "no image" in app_error(client, None, "What?", 3, api_name="/capture")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png")
    assert "not a supported image" in app_error(client, handle_file(str(junk)), "What?", 3, api_name="/capture")
    assert "prompt is empty" in app_error(client, handle_file(EXAMPLE), "   ", 3, api_name="/capture")
    assert "no run yet" in app_error(client, 0, 0, "attention", api_name="/heatmaps")
    client.predict(handle_file(EXAMPLE), "What color is the circle?", 2, api_name="/capture")
    assert "layer 5 is out of range" in app_error(client, 5, 0, "attention", api_name="/heatmap_layer")
    assert "token 9 is out of range" in app_error(client, 0, 9, "attention", api_name="/heatmaps")
    assert "out of range" in app_error(client, ["7"], "drop", api_name="/truncate")
    assert "pick at least one depth" in app_error(client, [], "drop", api_name="/truncate")
    for bad in ("../escape", "a/b", ".hidden", ""):
        assert "name" in app_error(client, bad, api_name="/save_run")
    msg = app_error(client, "broken-run", api_name="/load_run")
    assert "format version 999" in msg
    assert "no run named" in app_error(client, "does-not-exist", api_name="/load_run")
    info, *_ = client.predict(CACHED[0], api_name="/load_run")               # still serving
    assert info["label"] == CACHED[0]


def test_sessions_do_not_see_each_other(app):
    a, b = Client(app[1], verbose=False), Client(app[1], verbose=False)
    info, *_ = a.predict(handle_file(EXAMPLE), "What color is the circle?", 2, api_name="/capture")
    assert "no run yet" in app_error(b, 0, 0, "attention", api_name="/heatmaps")
    assert "not one of this session's runs" in app_error(b, info["run_id"], api_name="/switch_run")
    a.predict(0, 0, "attention", api_name="/heatmaps")


def test_concurrent_captures_are_serialised(app):
    results, errors = [], []

    def go(prompt):
        try:
            c = Client(app[1], verbose=False)
            results.append(c.predict(handle_file(EXAMPLE), prompt, 2, api_name="/capture")[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=go, args=(p,)) for p in ("What color is the circle?", "Describe the image.")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2
    assert {r["prompt"] for r in results} == {"What color is the circle?", "Describe the image."}


def test_teaching_mode(teaching):
    demo, url = teaching
    c = Client(url, verbose=False)
    assert demo.dashboard.holder.state == "off"
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for eid in ("vl-run", "vl-scene", "vl-compare", "vl-sweep-btn", "vl-stages-btn"):
        assert by_id[eid].interactive is False, eid            # nothing that needs a model is clickable
    assert "vl-teaching-note" in by_id
    assert "teaching mode" in app_error(c, handle_file(EXAMPLE), "What?", 2, api_name="/capture")
    info, gen_md, strip, headline = c.predict(api_name="/open_default")
    assert info["label"] == CACHED[1] and demo.dashboard.holder.state == "off"   # read from disk, no model
    assert "depth" in headline                                               # sweep cliff from sweep.json
    single, grid, *_ = c.predict(1, 0, "attention", api_name="/heatmaps")
    assert "layer 1" in heat(single)["hovertemplate"]
    assert "teaching mode" in app_error(c, ["0"], "drop", api_name="/truncate")
    assert "teaching mode" in app_error(c, api_name="/substitution")


def test_store_is_bounded():
    from vlmlens.errors import InputError
    from vlmlens.ui.store import RunStore

    store = RunStore(capacity=2)
    ids = [store.add(object(), label=str(i)).id for i in range(3)]
    assert not store.has(ids[0]) and store.has(ids[2]) and len(store) == 2
    with pytest.raises(InputError, match="no longer in the server's memory"):
        store.get(ids[0])
    assert np.unique(ids).size == 3


def test_store_is_bounded_by_bytes():
    from types import SimpleNamespace

    from vlmlens.ui.store import RunStore

    big = SimpleNamespace(arrays={"a": np.zeros(1000, dtype=np.float32)})   # 4000 bytes
    store = RunStore(capacity=10, max_bytes=10_000)
    ids = [store.add(big, label=str(i)).id for i in range(4)]
    assert [store.has(i) for i in ids] == [False, False, True, True]
    huge = SimpleNamespace(arrays={"a": np.zeros(10_000, dtype=np.float32)})
    last = store.add(huge, label="huge").id
    assert store.has(last) and len(store) == 1                                # the newest always stays


def test_random_scene_has_ground_truth(client):
    image, prompts, truth = client.predict(api_name="/random_scene")
    assert Path(image).is_file() and "Ground truth" in truth and "object" in truth
    labels = [c[0] for c in prompts["choices"]]
    assert any(l.startswith("[one word]") for l in labels) and any(l.startswith("[caption]") for l in labels)


def test_missing_tiny_model_falls_back_to_teaching_mode(monkeypatch, tmp_path, runs_dir):
    from vlmlens.models import loading
    from vlmlens.ui.callbacks import Dashboard

    monkeypatch.setitem(loading.BUILTIN, "tiny-shapes", tmp_path / "not-there")
    dash = Dashboard(model="tiny-shapes", runs_dir=runs_dir)
    assert dash.holder.state == "off"
    assert "not present" in dash.holder.off_reason and "not present" in dash.holder.status_markdown()
    assert dash.default_run in CACHED


def test_cached_runs_usable_while_the_model_loads(runs_dir, lm):
    from vlmlens.ui.callbacks import Dashboard, new_session

    release = threading.Event()
    dash = Dashboard(model="random:llava", runs_dir=runs_dir, loader=lambda *a, **k: release.wait(30) and lm)
    try:
        assert dash.holder.state == "loading" and "loading" in dash.holder.status_markdown()
        sess, info, *_ = dash.open_default(new_session())
        # the loader is still held back: had opening the cached run waited for the model, it could only
        # have returned once the loader gave up (state "ready" or "off"), never while "loading"
        assert dash.holder.state == "loading" and info["label"] == dash.default_run
        fig = dash.heatmap_layer(sess, 1, 0, "attention")
        assert any(t.type == "heatmap" for t in fig.data)
    finally:
        release.set()
    assert dash.holder.wait(30) is lm and dash.holder.state == "ready"


def test_empty_runs_folder_page_load_is_quiet(tmp_path):
    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(no_model=True, runs_dir=tmp_path)
    sess, info, gen, strip, headline = dash.open_default(new_session())
    assert info == {} and "No run yet" in strip and dash.default_run is None
    assert all(x == {"__type__": "update"} for x in dash.sync_controls(sess, 0))          # gr.skip()
    assert all(x == {"__type__": "update"} for x in dash.downloads_if_shown(sess))     # no run: nothing to offer
    assert "No saved runs" in dash.runs.table_markdown()


def test_the_runs_tab_offers_the_shown_runs_files_without_a_click(runs_dir):
    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(no_model=True, runs_dir=runs_dir)
    sess, info, *_ = dash.open_default(new_session())
    assert all(x == {"__type__": "update"} for x in dash.downloads_if_shown(sess, "overview"))   # another tab: later
    zpath, cpath, hpath = dash.downloads_if_shown(sess, "runs")
    assert Path(zpath).name == f"{info['label']}.zip" and Path(cpath).is_file() and Path(hpath).is_file()


def test_app_defaults_are_safe():
    import app

    a = app.parse_args([])
    assert (a.host, a.port, a.share, a.trust_remote_code, a.no_model, a.model) == \
        ("127.0.0.1", 7860, False, False, False, "tiny-shapes")


def test_library_never_imports_gradio():
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, vlmlens\n"
            "for m in pkgutil.walk_packages(vlmlens.__path__, 'vlmlens.'):\n"
            "    if not m.name.startswith('vlmlens.ui') and not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print('gradio' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_shipped_cached_runs_are_valid():
    """cached_runs/ must load with this vlmlens (else: python -m vlmlens make-cached-runs)."""
    from vlmlens.cached import SPECS_BY_MODEL, photo
    from vlmlens.errors import InputError
    from vlmlens.experiments.compare import TruncationResult
    from vlmlens.run_files import is_run_dir, load_run

    root = Path(__file__).resolve().parents[1] / "cached_runs"
    from vlmlens.images import image_sha256, load_image

    dirs = [p for p in sorted(root.iterdir()) if is_run_dir(p)]
    index = {r["name"]: r for r in json.loads((root / "index.json").read_text())["runs"]}
    assert {d.name for d in dirs} == set(index)                           # the index lists every run, nothing else
    families, total = {}, 0
    for d in dirs:
        run = load_run(d)
        entry = index[d.name]
        model = run.meta["model"]
        assert model == entry["model"] and d.name in {s[0] for s in SPECS_BY_MODEL[model]}, d.name
        sweep = TruncationResult.from_json(json.loads((d / "sweep.json").read_text()))
        assert [x.depth for x in sweep.depths] == list(range(run.n_layers + 1))
        assert sweep.baseline_text == run.generated_text == entry["generated"]   # same model, same greedy output
        assert {"llava_cam", "logit_lens_ids", "hidden_states"} <= set(run.arrays)
        families.setdefault(model, set()).add(run.meta["task"]["family"])
        if model == "tiny-shapes":
            # the shipped model answers its example prompts right, except where a run says otherwise
            assert (run.generated_text.strip() == entry["truth"]) != d.name.endswith("-mistake"), d.name
        if entry["family"] == "photo":
            try:
                source = photo(entry["image"])
            except InputError:                                            # opencv-doc absent: nothing to compare
                source = None
        else:
            source = load_image(EXAMPLES_DIR / entry["image"])[0]
        if source is not None:
            assert run.meta["image_sha256"] == image_sha256(source), \
                f"{d.name} was made from another {entry['image']}: python -m vlmlens make-cached-runs"
        total += sum(f.stat().st_size for f in d.iterdir())
    assert families["tiny-shapes"] == {"single", "caption", "reasoning"}
    assert len([d for d in dirs if index[d.name]["model"] == "tiny-shapes"]) >= 6
    assert total < 40e6


def test_substitution_skip_and_compute_tabs(client):
    info, *_ = client.predict(handle_file(EXAMPLE), "What color is the circle?", 2, api_name="/capture")
    L = info["n_layers"]
    comp, prune_md, pick, prune_fig = client.predict(api_name="/compute_view")  # theory, stored at capture
    comp = plot(comp)
    assert "No pruning comparison" in prune_md and "Compare pruning methods first" in str(prune_fig)
    xs = {tuple(arr(t["x"]).tolist()) for t in comp["data"] if "x" in t}
    assert tuple(range(L + 1)) in xs
    sub, skip = client.predict(api_name="/substitution")
    cells = [t for t in plot(sub)["data"] if t["type"] == "heatmap"]
    assert cells and arr(cells[0]["z"]).shape == (L, L)                       # at_layer x from_layer
    sub, skip = client.predict(api_name="/layer_skip")
    kl = [t for t in plot(skip)["data"] if "KL" in (t.get("name") or "")]
    assert kl and all(len(arr(t["y"])) == L for t in kl)                      # one point per skipped layer
    comp, headline = client.predict(api_name="/measure_compute")
    assert any("measured" in (t.get("name") or "") for t in plot(comp)["data"])
    # token pruning on the current input: a table per method and the kept tokens on the image grid
    md, pick, fig = client.predict("fastv:1:0.5,vtw:0", api_name="/prune_compare")
    assert "| fastv:1:0.5 |" in md and "| vtw:0 |" in md
    assert pick["value"] == "fastv:1:0.5" and [c[0] for c in pick["choices"]] == ["fastv:1:0.5", "vtw:0"]
    z = [t for t in plot(fig)["data"] if t["type"] == "image"]
    assert len(z) == 2                                          # over the picture: layer 0 (all kept), layer 1 (half)
    fig = client.predict("vtw:0", api_name="/prune_view")
    assert "layer 0: 0/" in str(plot(fig)["layout"]["annotations"])
    assert "unknown method" in app_error(client, "shrink:1", api_name="/prune_compare")
    md, pick, fig = client.predict("stages:0.5", api_name="/prune_compare")   # this run's causal stages (at capture)
    assert "| stages:0.5 |" in md
    assert "no method 'fastv:9:0.5'" in app_error(client, "fastv:9:0.5", api_name="/prune_view")
    # the map shown, checked against causal effects (deletion / insertion vs random orders), newest first
    md, fig = client.predict(0, 0, "attention", api_name="/map_check")
    assert "**causal**: attention, layer 0" in md and "random" in md
    assert "attention, layer 0" in [t.get("name") for t in plot(fig)["data"]]
    md, fig = client.predict(1, 0, "LLaVA-CAM", api_name="/map_check")
    assert md.index("LLaVA-CAM, layer 1") < md.index("attention, layer 0")
    assert "out of range" in app_error(client, 0, 99, "attention", api_name="/map_check")


def test_ground_truth_and_causal_stages_follow_the_run(runs_dir, lm):
    """A cached run shows its own scene's truth; a capture of an example with one of its prompts
    carries the truth into the headline; the knockout stages are measured at capture (small
    model) and by the Attention tab's button; every headline has a status."""
    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(model="random:llava", runs_dir=runs_dir, loader=lambda *a, **k: lm)
    dash.holder.wait(30)
    sess, info, _gen, _strip, headline = dash.load_run(CACHED[1], new_session())
    controls = dash.sync_controls(sess, 0)
    truth_md = controls[5]
    image_in, prompt_in, n_in = controls[6:9]                # the input panel shows the opened run
    assert prompt_in == dash.entry(sess).run.prompt and image_in is dash.entry(sess).run.image
    assert n_in == dash.entry(sess).run.meta["generation"]["max_new_tokens"]
    want = json.loads((runs_dir / CACHED[1] / "run.json").read_text())["meta"]["task"]
    assert "This run's scene" in truth_md and f"scene seed {want['seed']}" in truth_md and want["answer"] in truth_md
    assert {f["status"] for f in info["findings"]} <= {"causal", "measured", "proxy", "not found", "unverified"}
    ex = next(e for e in dash.examples if e["file"].endswith("shapes_00.png"))
    prompt, answer = ex["prompts"]["single"][0]["prompt"], ex["prompts"]["single"][0]["answer"]
    sess, info, _gen, _strip, headline = dash.capture(EXAMPLE, prompt, 2, sess)
    entry = dash.entry(sess)
    assert entry.run.meta["task"]["answer"] == answer
    assert "answer vs ground truth" in headline and repr(answer) in headline
    assert "stages" in entry.extras and "three stages" in headline and "✔ causal" in headline
    assert "sweep cliff" in headline and "unverified" in headline            # no sweep yet: said so
    flow, heads, stages_md, headline2 = dash.find_stages(sess)
    assert "Three stages (causal" in stages_md and "prefix" in stages_md
    assert any("(knockout)" in (a.text or "") for a in flow.layout.annotations)
    plain, *_rest, headline = dash.capture(EXAMPLE, "Describe this picture please.", 2, sess)
    md = dash.sync_controls(plain, 0)[5]            # the scene is known, the answer to this prompt is not
    assert "This run's scene" in md and "Truth for its prompt" not in md
    assert "answer vs ground truth" not in headline
    from PIL import Image

    other, *_rest = dash.capture(Image.new("RGB", (64, 64), (10, 200, 30)), prompt, 2, sess)
    assert "No ground truth" in dash.sync_controls(other, 0)[5]       # never a stale truth of another scene


def test_cam_zero_by_construction_is_explained(runs_dir):
    import numpy as np

    from vlmlens.ui import run_views
    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(no_model=True, runs_dir=runs_dir)
    sess, *_ = dash.load_run(CACHED[0], new_session())
    entry = dash.entry(sess)
    L = entry.run.n_layers
    cam = np.asarray(entry.run.arrays["llava_cam"])
    assert np.all(cam[L - 1] == 0)                                           # zero by construction
    fig = dash.heatmap_layer(sess, L - 1, 0, "LLaVA-CAM")
    text = " ".join(a.text or "" for a in fig.layout.annotations)
    assert "zero at the last layer by construction" in text and not [t for t in fig.data if t.type == "heatmap"]
    assert run_views.cam_zero_reason(entry.run, np.ones((L, 4)), 0) is None
    assert "after the ReLU" in run_views.cam_zero_reason(entry.run, np.zeros((L, 4)), 0)


def test_save_with_spaces_and_shareable_link(runs_dir, tmp_path):
    import shutil
    from types import SimpleNamespace

    from vlmlens.ui.callbacks import Dashboard, new_session

    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / CACHED[0], runs / CACHED[0])
    dash = Dashboard(no_model=True, runs_dir=runs)
    sess, *_ = dash.load_run(CACHED[0], new_session())
    msg, dropdown, table = dash.save_run("  my first run ", sess)
    assert (runs / "my-first-run").is_dir() and "spaces became dashes" in msg and "?run=my-first-run" in msg
    assert "[?run=my-first-run](?run=my-first-run)" in table
    page = SimpleNamespace(query_params={"run": "my-first-run"})      # the page opened as .../?run=my-first-run
    sess2, info, *_ = dash.open_default(new_session(), page)
    assert info["label"] == "my-first-run"
    with pytest.raises(Exception, match="no run named"):
        dash.open_default(new_session(), SimpleNamespace(query_params={"run": "nope"}))


def test_compare_two_runs(runs_dir, lm):
    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(model="random:llava", runs_dir=runs_dir, loader=lambda *a, **k: lm)
    dash.holder.wait(30)
    sess, info, *_ = dash.load_run(CACHED[0], new_session())
    md, flow, dyn = dash.compare_runs(sess, CACHED[1])                  # a saved run by name
    other_prompt = json.loads((runs_dir / CACHED[1] / "run.json").read_text())["meta"]["prompt"]
    assert dash.entry(sess).run.prompt in md and other_prompt in md and "sweep cliff" in md
    assert any(t.name.endswith("(other)") for t in flow.data) and any(t.name.endswith(f"({CACHED[1]})") for t in dyn.data)
    sess2, *_ = dash.capture(EXAMPLE, "What color is the circle?", 2, sess)
    md2, *_ = dash.compare_runs(sess2, info["run_id"])                 # one of this session's runs by id
    assert "What color is the circle?" in md2
    with pytest.raises(Exception, match="pick the other run"):
        dash.compare_runs(sess2, "")
    picks = dash.sync_controls(sess2, 0)[9]
    assert any(v == info["run_id"] for _, v in picks.choices) and any(v == CACHED[1] for _, v in picks.choices)


def test_large_uploads_are_scaled_down_before_the_model_sees_them(lm, runs_dir):
    from PIL import Image

    from vlmlens.ui.callbacks import Dashboard, new_session

    dash = Dashboard(model="random:llava", runs_dir=runs_dir, loader=lambda *a, **k: lm, max_image_side=640)
    dash.holder.wait(30)
    big = Image.new("RGB", (3000, 2000), (200, 40, 40))
    sess, *_ = dash.capture(big, "What is this?", 1, new_session())
    run = dash.entry(sess).run
    assert run.image.size == (640, 427) and "scaled down from 3000x2000 to 640x427" in run.meta["image_note"]
    small, *_ = dash.capture(Image.new("RGB", (64, 64)), "What is this?", 1, sess)
    assert dash.entry(small).run.image.size == (64, 64) and not dash.entry(small).run.meta.get("image_note")


def test_study_tab_opens_a_study_without_a_model(tmp_path, lm):
    """The Study tab reads a finished dataset study: table with intervals, figure, any row's outputs;
    it opens only studies under --study, never a typed path."""
    import json as _json

    from vlmlens.data import load_dataset
    from vlmlens.experiments.dataset_study import dataset_study
    from vlmlens.ui.callbacks import Dashboard

    root = Path(__file__).resolve().parents[1] / "assets" / "datasets" / "shapes-mini"
    rows = [_json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()][:3]
    import shutil

    (tmp_path / "data" / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(root / r["image"], tmp_path / "data" / r["image"])    # (a link out of the folder is refused)
    (tmp_path / "data" / "m.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    res = dataset_study(lm, load_dataset(tmp_path / "data" / "m.jsonl"), tmp_path / "studies" / "s1", depths=[0],
                        max_new_tokens=2)
    dash = Dashboard(no_model=True, runs_dir=tmp_path / "runs", studies=tmp_path / "studies")
    assert dash.study_names() == ["s1"]
    md, fig, row_pick, row_html, csv_path = dash.study_open("s1")
    assert Path(csv_path).read_bytes() == res.csv().encode() and Path(csv_path).name == "s1-study.csv"
    assert "| vqa | 0 | 3 |" in md and "| vqa | 2 | 3 |" in md and "random:llava" in md
    assert {t.name.split(" (")[0] for t in fig.data if t.name} >= {"vqa"}
    assert row_pick["choices"] == [r["id"] for r in rows] or [c[0] for c in row_pick["choices"]] == [r["id"] for r in rows]
    assert rows[0]["question"] in row_html and "<td>0</td>" in row_html and "<td>2</td>" in row_html
    assert rows[1]["question"] in dash.study_item("s1", rows[1]["id"])
    for bad, msg in [(lambda: dash.study_open("../etc"), "unknown study"), (lambda: dash.study_item("s1", "nope"),
                                                                             "no row 'nope'")]:
        with pytest.raises(Exception, match=msg):
            bad()
    with pytest.raises(Exception, match="start the app with --study"):
        Dashboard(no_model=True, runs_dir=tmp_path / "runs").study_open("s1")
    assert res.n_items == 3


def test_a_shown_runs_views_are_drawn_ahead(runs_dir, monkeypatch, caplog):
    """Opening a run draws, in the background, every figure its tabs show without a model: opening Attention,
    Heatmaps, Dynamics, Truncation and Compute afterwards draws nothing (each figure is in the run's cache)."""
    from vlmlens.ui.callbacks import Dashboard, new_session
    from vlmlens.ui.store import Derived

    caplog.set_level(logging.DEBUG, logger="vlmlens.ui")   # a draw that failed in the background says why
    dash = Dashboard(no_model=True, runs_dir=runs_dir, default_run=CACHED[1])
    sess, info, *_ = dash.open_default(new_session())
    dash._prefetch.submit(lambda: None).result(timeout=300)   # one worker: this runs after the run's views
    drawn = []
    real = Derived.get

    def get(self, key, compute):
        if self.peek(key) is None:
            drawn.append(key)
        return real(self, key, compute)

    monkeypatch.setattr(Derived, "get", get)
    dash.attention(sess)
    dash.heatmaps(sess, 0, 0, "attention")
    dash.heatmap_layer(sess, 1, 0, "attention")
    dash.dynamics(sess, "image")
    dash.truncation_view(sess)
    dash.compute_view(sess)
    assert drawn == [], (drawn, [r.getMessage() + "\n" + (r.exc_text or "") for r in caplog.records])


def test_a_figure_cut_short_by_the_program_ending_is_not_reported_as_a_bug(caplog):
    """A view drawn ahead while the program exits fails on a refused import (Python's own RuntimeError); the
    log keeps tracebacks for real failures only."""
    import logging

    from vlmlens.ui import panels

    def refused(run):
        raise RuntimeError("can't register atexit after shutdown")

    def broken(run):
        raise RuntimeError("a real bug")

    with caplog.at_level(logging.INFO, logger="vlmlens.ui"):
        a = panels.figure(refused, None, title="Token map")
        b = panels.figure(broken, None, title="Token map")
    assert [r.getMessage() for r in caplog.records] == ["broken failed"]
    assert "RuntimeError" in json.dumps(a.to_plotly_json()["layout"]) and "a real bug" in json.dumps(b.to_plotly_json()["layout"])
    assert panels.refused_at_exit(RuntimeError("cannot schedule new futures after interpreter shutdown"))
    assert not panels.refused_at_exit(RuntimeError("a real bug")) and not panels.refused_at_exit(ValueError("shutdown"))
