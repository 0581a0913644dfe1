"""Reliability: bounded work per request, atomic saves under races, hostile run files, bounded
disk use, no telemetry. Each test names the defect it guards against."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vlmlens as vl
from vlmlens.capture import MAX_PROMPT_CHARS
from vlmlens.errors import InputError
from vlmlens.run import RunFormatError

from tests._models import random_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    return random_lm("llava")


@pytest.fixture(scope="module")
def small_run(lm, image):
    return vl.capture(lm, image, "What is this?", max_new_tokens=2)


# ---- bounded work per request ----------------------------------------------------------------------

def test_prompt_over_the_context_is_refused_before_any_forward(lm, image):
    words = "circle " * 1500                              # 1,500 tokens for a model with 1,024 positions
    forwards = []
    hook = lm.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        with pytest.raises(InputError, match=r"too long for this model: the prompt is 1,5\d\d tokens .* at most 1,024"):
            vl.capture(lm, image, words, max_new_tokens=4)
    finally:
        hook.remove()
    assert forwards == []                                 # refused before the model ran at all
    from vlmlens.experiments.compare import sweep

    with pytest.raises(InputError, match="too long for this model"):   # experiments refuse it too, before prefill
        sweep(lm, image, words, max_new_tokens=4)
    with pytest.raises(InputError, match="at most 1,024"):           # the generation budget counts
        vl.capture(lm, image, "What is this?", max_new_tokens=1024)


def test_prompt_over_the_character_limit_is_refused_untokenised(lm, image):
    with pytest.raises(InputError, match=f"at most {MAX_PROMPT_CHARS:,}"):
        vl.capture(lm, image, "What color is the circle? " * 4000, max_new_tokens=1)


def test_time_limit_stops_generation_cleanly(lm, image):
    run = vl.capture(lm, image, "What is this?", max_new_tokens=200, time_limit=1e-4)
    assert run.meta["generation"]["stop_reason"] == "time limit"
    assert len(run.generated_tokens) < 200
    with pytest.raises(InputError, match="time_limit"):
        vl.capture(lm, image, "What is this?", max_new_tokens=1, time_limit=-1)


# ---- atomic saves -------------------------------------------------------------------------------------

def _race(runs_dir: Path, run, n: int) -> list:
    from vlmlens.ui.store import RunsDir

    rd = RunsDir(runs_dir)
    out, barrier = [], threading.Barrier(n)

    def one(i):
        barrier.wait()
        try:
            rd.save("race", run, {"marker": {"writer": i}})
            out.append(("ok", i))
        except InputError as e:
            out.append(("taken", str(e)))
        except Exception as e:  # noqa: BLE001 -- a raw OS error is a failure of the test
            out.append(("error", repr(e)))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_saves_to_one_name_have_exactly_one_winner(tmp_path, small_run):
    for round_ in range(5):
        d = tmp_path / f"round{round_}"
        d.mkdir()
        out = _race(d, small_run, 6)
        wins = [x for x in out if x[0] == "ok"]
        assert len(wins) == 1 and all(x[0] == "taken" and "already exists" in x[1] for x in out if x[0] != "ok"), out
        saved = d / "race"
        assert json.loads((saved / "extras.json").read_text())["marker"]["writer"] == wins[0][1]
        vl.load_run(saved)
        assert sorted(p.name for p in d.iterdir()) == ["race"]            # no temp or .old folders left
        assert (saved.stat().st_mode & 0o777) == 0o755


def _save_in_process(args):
    path, i = args
    import vlmlens as vl_
    from vlmlens.run_files import save_run
    from vlmlens.run import Run, TokenSpans
    from PIL import Image

    run = Run(meta={"model": "m", "family": "llava", "n_layers": 1, "writer": i}, tokens=["a", "<image>"],
              token_ids=[1, 2], spans=TokenSpans(2, 2, (1,)), image_grid=(1, 1), generated_text="",
              token_logprobs=[], image=Image.new("RGB", (4, 4)), arrays={})
    try:
        save_run(run, path, overwrite=False, extras={"marker": {"writer": i}})
        return ("ok", i)
    except FileExistsError:
        return ("taken", i)
    finally:
        del vl_


def test_concurrent_saves_across_processes(tmp_path):
    dest = tmp_path / "runs" / "race"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        out = pool.map(_save_in_process, [(str(dest), i) for i in range(8)])
    wins = [i for s, i in out if s == "ok"]
    assert len(wins) == 1, out
    run = vl.load_run(dest)
    assert run.meta["writer"] == wins[0] == json.loads((dest / "extras.json").read_text())["marker"]["writer"]
    assert [p.name for p in dest.parent.iterdir()] == ["race"]


# ---- hostile run files -----------------------------------------------------------------------------------

def test_deeply_nested_json_is_a_clear_error_and_hides_no_other_run(tmp_path, small_run):
    from vlmlens.ui.callbacks import Dashboard, new_session

    runs = tmp_path / "runs"
    vl.save_run(small_run, runs / "good")
    bad = runs / "deep"
    shutil.copytree(runs / "good", bad)
    (bad / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    deep_extras = runs / "deep-extras"
    shutil.copytree(runs / "good", deep_extras)
    (deep_extras / "extras.json").write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    with pytest.raises(RunFormatError, match="nested too deeply"):
        vl.load_run(bad)
    dash = Dashboard(no_model=True, runs_dir=runs)                      # the app starts
    assert set(dash.runs.names()) == {"good", "deep", "deep-extras"}
    assert "(unreadable run.json)" in dash.runs.table_markdown()
    sess, info, *_ = dash.load_run("good", new_session())
    assert info["label"] == "good"
    for name in ("deep", "deep-extras"):
        with pytest.raises(Exception, match="nested too deeply"):
            dash.load_run(name, new_session())
    p = subprocess.run([sys.executable, "-m", "vlmlens", "show", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr


def test_oversized_json_is_refused_unread(tmp_path, small_run, monkeypatch):
    from vlmlens import run_files

    d = vl.save_run(small_run, tmp_path / "big")
    monkeypatch.setattr(run_files, "MAX_JSON_BYTES", 1000)
    with pytest.raises(RunFormatError, match="at most"):
        vl.load_run(d)


# ---- bounded disk, no telemetry ---------------------------------------------------------------------------

def test_downloads_leave_a_bounded_number_of_temp_folders(tmp_path, small_run):
    from vlmlens.ui.callbacks import Dashboard, new_session

    vl.save_run(small_run, tmp_path / "runs" / "one")
    dash = Dashboard(no_model=True, runs_dir=tmp_path / "runs")
    sess, *_ = dash.load_run("one", new_session())
    made = []
    for _ in range(12):
        z, c, h = dash.downloads(sess)
        made.append(Path(z).parents[1])
        assert Path(z).is_file() and Path(c).is_file() and Path(h).is_file()
        assert not [p for p in Path(z).parent.iterdir() if p.is_dir()]    # only the zip, not the unzipped copy
    alive = [d for d in dict.fromkeys(made) if d.exists()]
    assert len(alive) == dash.export_dirs.keep and alive == list(dict.fromkeys(made))[-dash.export_dirs.keep:]
    dash.export_dirs.close()
    assert not any(d.exists() for d in made)


def test_no_telemetry_and_bounded_inputs():
    from vlmlens.ui import build_demo

    demo = build_demo(no_model=True, runs_dir=None)
    assert demo.analytics_enabled is False
    prompt = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "vl-prompt")
    assert prompt.max_length == MAX_PROMPT_CHARS
    import app

    a = app.parse_args([])
    assert a.time_limit == 120.0 and a.max_upload_mb == 20.0


def test_the_hub_client_sends_no_telemetry_and_looks_nothing_up(tmp_path):
    """The HF hub client, unless told otherwise, puts the torch version in every request and fetches a
    registry from the hub once a day, even for a cache-only load; importing vlmlens turns that off, also
    when huggingface_hub was imported first. An explicit user setting still wins."""
    code = """
import json, os, socket, sys
import huggingface_hub.constants
import vlmlens
from huggingface_hub.utils import build_hf_headers
looked = []
real = socket.getaddrinfo
socket.getaddrinfo = lambda *a, **k: looked.append(a[:2]) or real(*a, **k)
print(json.dumps([build_hf_headers()["user-agent"], looked, os.environ.get("GRADIO_ANALYTICS_ENABLED")]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_TELEMETRY", "GRADIO_ANALYTICS_ENABLED")}
    env["HF_HOME"] = str(tmp_path)                        # no cached registry to fall back on

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    agent, looked, gradio = run()
    assert looked == [] and "torch/" not in agent and gradio == "False"
    agent, looked, gradio = run(HF_HUB_DISABLE_TELEMETRY="0", GRADIO_ANALYTICS_ENABLED="True")
    assert "torch/" in agent and gradio == "True"          # the user's choice is kept (the lookup may follow)


# ---- fair sharing, links, concurrency -----------------------------------------------------------------------

def test_one_busy_session_evicts_only_its_own_runs():
    from vlmlens.ui.store import RunStore

    store = RunStore(capacity=16, per_owner=6)
    others = [store.add(object(), label=f"b{i}", owner="b").id for i in range(3)]
    busy = [store.add(object(), label=f"a{i}", owner="a").id for i in range(64)]
    assert all(store.has(i) for i in others)                          # b keeps every run
    assert [store.has(i) for i in busy[-6:]] == [True] * 6 and not any(store.has(i) for i in busy[:-6])
    many = [store.add(object(), label=f"o{i}", owner=f"o{i}").id for i in range(20)]   # the store fills up
    assert len(store) == 16 and store.has(many[-1])
    assert sum(store.has(i) for i in busy) < 6                         # the heaviest session gave way first


def test_runs_linked_from_outside_the_folder_are_refused(tmp_path, small_run):
    from vlmlens.ui.store import RunsDir

    runs, outside = tmp_path / "runs", tmp_path / "outside"
    vl.save_run(small_run, runs / "inside")
    vl.save_run(small_run, outside / "secret")
    (runs / "linked").symlink_to(outside / "secret", target_is_directory=True)
    (runs / "alias").symlink_to(runs / "inside", target_is_directory=True)   # a link within the folder is fine
    rd = RunsDir(runs)
    assert rd.names() == ["alias", "inside"]
    with pytest.raises(InputError, match="outside"):
        rd.open("linked")
    rd.open("alias")


def test_ten_sessions_with_mixed_requests_see_only_their_own_runs(tmp_path, lm, image):
    import socket

    from gradio_client import Client, handle_file

    from vlmlens.ui import build_demo

    image.save(tmp_path / "img.png")
    demo = build_demo("random:llava", runs_dir=tmp_path / "runs", loader=lambda *a, **k: lm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    demo.dashboard.holder.wait(60)
    errors, seen = [], {}

    def session(i):
        try:
            c = Client(f"http://127.0.0.1:{port}/", verbose=False)
            prompt = f"What is shape number {i}?"
            info, *_ = c.predict(handle_file(str(tmp_path / "img.png")), prompt, 2, api_name="/capture")
            c.predict(i % lm.n_layers, 0, "attention", api_name="/heatmap_layer")
            c.predict("image", api_name="/dynamics")
            c.predict(api_name="/attention")
            again, *_ = c.predict(info["run_id"], api_name="/switch_run")
            seen[i] = (prompt, info["prompt"], again["prompt"], info["run_id"])
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append((i, repr(e)))
    threads = [threading.Thread(target=session, args=(i,)) for i in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        demo.close()
    assert not errors, errors
    assert len(seen) == 10 and all(p == a == b for p, a, b, _ in seen.values())
    assert len({r for *_, r in seen.values()}) == 10


def test_a_capture_over_the_time_limit_stops_while_others_are_served(tmp_path, lm, image):
    """One session's long generation stops at the app's time limit with a note; another
    session's view requests are answered meanwhile (views do not wait for the model)."""
    import socket

    from gradio_client import Client, handle_file

    from vlmlens.ui import build_demo

    image.save(tmp_path / "img.png")
    demo = build_demo("random:llava", runs_dir=tmp_path / "runs", loader=lambda *a, **k: lm, time_limit=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    demo.dashboard.holder.wait(60)
    url = f"http://127.0.0.1:{port}/"
    try:
        other = Client(url, verbose=False)
        other.predict(handle_file(str(tmp_path / "img.png")), "What is this?", 1, api_name="/capture")
        done, served = {}, []

        def long_capture():
            c = Client(url, verbose=False)
            done["info"] = c.predict(handle_file(str(tmp_path / "img.png")), "What is this?", 256, api_name="/capture")[0]
            done["end"] = time.perf_counter()
        t = threading.Thread(target=long_capture)
        t.start()
        while len(served) < 50:
            other.predict(0, 0, "attention", api_name="/heatmap_layer")
            served.append(time.perf_counter())
            if not t.is_alive():
                break
        t.join(120)
    finally:
        demo.close()
    run = demo.dashboard.store.get(done["info"]["run_id"]).run
    assert run.meta["generation"]["stop_reason"] == "time limit" and len(run.generated_tokens) < 256
    # the other session kept being served while the long capture ran (ordering, not a clock bound)
    assert sum(end < done["end"] for end in served) >= 1
