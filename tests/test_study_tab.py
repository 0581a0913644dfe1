"""Running a study from the dashboard's Study tab: the same engine as ``python -m vlmlens study``,
bounded (rows, time limit), continued when stopped, and only on datasets and into folders the app
was started with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES_MINI = ROOT / "assets" / "datasets" / "shapes-mini"


@pytest.fixture(scope="module")
def lm():
    from tests._models import random_lm

    return random_lm("llava")


@pytest.fixture()
def dash(tmp_path, lm):
    """A dashboard on a tiny random LLaVA, with one dataset (8 shapes-mini rows) and an empty studies folder."""
    from vlmlens.ui.callbacks import Dashboard

    rows = [json.loads(x) for x in (SHAPES_MINI / "manifest.jsonl").read_text().splitlines()][:8]
    data = tmp_path / "datasets" / "mini"
    (data / "images").mkdir(parents=True)
    for r in rows:
        shutil.copy(SHAPES_MINI / r["image"], data / r["image"])
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = Dashboard(model="random:llava", loader=lambda *a, **k: lm, runs_dir=tmp_path / "runs",
                  studies=tmp_path / "studies", datasets=tmp_path / "datasets")
    d.holder.wait(60)
    return d


def _reference(lm, tmp_path, rows: int, depths, max_new: int):
    from vlmlens.data import load_dataset
    from vlmlens.experiments.dataset_study import dataset_study

    data = load_dataset(tmp_path / "datasets" / "mini")
    data.items = data.items[:rows]
    return dataset_study(lm, data, tmp_path / "reference", depths=depths, max_new_tokens=max_new)


def test_a_study_run_from_the_tab_equals_the_engine_run_directly(dash, lm, tmp_path):
    L = lm.n_layers
    assert L >= 2
    pick, md, fig, row_pick, row_html, csv_path = dash.study_run("mini", 5, "0", 2, 3, "s1")
    assert pick["value"] == "s1" and "s1" in pick["choices"] and dash.study_names() == ["s1"]
    for k in (0, L):
        assert f"| vqa | {k} | 5 |" in md                                      # the first 5 rows, the asked depths
    assert "| vqa | 1 |" not in md
    cfg = json.loads((tmp_path / "studies" / "s1" / "study.json").read_text())["config"]
    assert cfg["depths"] == [0, L] and cfg["max_new_tokens"] == 3 and cfg["n_items"] == 5
    ref = _reference(lm, tmp_path, 5, [0], 3)
    from vlmlens.experiments.dataset_study import load_study

    study, _ = load_study(tmp_path / "studies" / "s1")
    # the tab's download is the study's own table, byte for byte what the CLI writes next to it
    assert Path(csv_path).read_bytes() == (tmp_path / "studies" / "s1" / "study.csv").read_bytes() == study.csv().encode()
    assert len(study.csv().splitlines()) == 1 + len(study.rows) and study.csv().startswith("task,encoder_depth,depth")
    key = lambda r: (r["task"], r["depth"])                                      # noqa: E731
    assert sorted((key(r), r["score"], r["answer_kept"]) for r in study.rows) == \
        sorted((key(r), r["score"], r["answer_kept"]) for r in ref.rows)


def test_a_stopped_study_keeps_its_rows_and_continues(dash, lm, tmp_path):
    import gradio as gr

    dash.study_time_limit = 0.0                                  # stops after its first batch
    with pytest.raises(gr.Error, match=r"time limit of one request after 2 of 6 rows.*'s2' to continue"):
        dash.study_run("mini", 6, "0", 2, 3, "s2")
    assert dash.study_names() == []                              # not a finished study yet
    done = [json.loads(x) for p in (tmp_path / "studies" / "s2").glob("results.rank*.jsonl")
            for x in p.read_text().splitlines()]
    assert len(done) == 2
    dash.study_time_limit = None
    pick, md, *_ = dash.study_run("mini", 6, "0", 2, 3, "s2")    # continued, not restarted
    assert pick["value"] == "s2" and "| vqa | 0 | 6 |" in md
    ref = _reference(lm, tmp_path, 6, [0], 3)
    from vlmlens.experiments.dataset_study import load_study

    from vlmlens.data import load_dataset

    study, records = load_study(tmp_path / "studies" / "s2")
    first6 = load_dataset(tmp_path / "datasets" / "mini").items[:6]
    assert sorted(str(r["id"]) for r in records) == sorted(it.id for it in first6)     # each row once
    assert sorted((r["depth"], r["score"]) for r in study.rows) == sorted((r["depth"], r["score"]) for r in ref.rows)
    with pytest.raises(gr.Error, match="other arguments"):       # same name, other settings: refused, nothing lost
        dash.study_run("mini", 6, "0,1", 2, 3, "s2")
    assert dash.study_names() == ["s2"]


@pytest.mark.parametrize("args, msg", [
    (("../mini", 4, "", 2, 3, "x"), "unknown dataset"),
    (("mini", 0, "", 2, 3, "x"), "rows must be a whole number from 1 to 200"),
    (("mini", 201, "", 2, 3, "x"), "rows must be a whole number from 1 to 200"),
    (("mini", 2.5, "", 2, 3, "x"), "rows must be a whole number"),
    (("mini", 4, "", 0, 3, "x"), "batch size must be a whole number from 1 to 32"),
    (("mini", 4, "", 2, 99, "x"), "max new tokens must be a whole number from 1 to 64"),
    (("mini", 4, "", 2, 3, "a b"), "invalid run name"),
    (("mini", 4, "", 2, 3, "../up"), "invalid run name"),
    (("mini", 4, "0,99", 2, 3, "x"), "99"),
])
def test_bad_study_requests_are_refused_and_write_nothing(dash, tmp_path, args, msg):
    import gradio as gr

    with pytest.raises(gr.Error, match=msg):
        dash.study_run(*args)
    assert not (tmp_path / "studies" / "x").exists() and not (tmp_path / "up").exists()
    assert dash.study_names() == []


def test_no_model_or_no_study_folder_is_said_plainly(tmp_path, dash):
    import gradio as gr

    from vlmlens.ui.callbacks import Dashboard

    off = Dashboard(no_model=True, runs_dir=tmp_path / "runs", studies=tmp_path / "studies",
                    datasets=tmp_path / "datasets")
    with pytest.raises(gr.Error, match="model"):
        off.study_run("mini", 2, "0", 1, 2, "t")
    one = tmp_path / "studies" / "one"
    dash.study_run("mini", 2, "0", 1, 2, "one")
    inside = Dashboard(no_model=True, runs_dir=tmp_path / "runs", studies=one, datasets=tmp_path / "datasets")
    with pytest.raises(gr.Error, match="itself one study"):
        inside.study_run("mini", 2, "0", 1, 2, "t")


def test_the_shipped_datasets_are_offered():
    from vlmlens.ui.callbacks import Dashboard

    d = Dashboard(no_model=True, start_loading=False)
    assert {"shapes-mini", "photos"} <= set(d.dataset_names()) and d.default_dataset() == "shapes-mini"


def test_a_study_being_run_elsewhere_is_refused_and_the_next_request_works(dash, tmp_path):
    """#25 item 1 in the tab: the study directory belongs to whoever runs it."""
    import socket
    import subprocess
    import sys

    import gradio as gr

    from vlmlens.experiments.study_files import LOCK

    out = tmp_path / "studies" / "busy"
    out.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "job": "cli",
                                            "started": "now", "command": "python -m vlmlens study"}))
        with pytest.raises(gr.Error, match=f"in use by another study: PID {holder.pid}"):
            dash.study_run("mini", 2, "0", 1, 2, "busy")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]             # nothing written beside the lock
        dash.study_run("mini", 2, "0", 1, 2, "free")                        # the next request runs
        assert "free" in dash.study_names() and not (tmp_path / "studies" / "free" / LOCK).exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_tab_reads_only_the_rows_it_runs(dash, tmp_path, monkeypatch):
    """#25 item 5: 2 rows of a 100,000-row manifest are 2 rows read, not 100,000."""
    import vlmlens.data as data_mod

    big = tmp_path / "datasets" / "big"
    (big / "images").mkdir(parents=True)
    first = json.loads((SHAPES_MINI / "manifest.jsonl").read_text().splitlines()[0])
    shutil.copy(SHAPES_MINI / first["image"], big / first["image"])
    with open(big / "manifest.jsonl", "w") as f:
        for i in range(100_000):
            f.write(json.dumps(dict(first, id=f"r{i}")) + "\n")
    seen = []
    real = data_mod._check_image
    monkeypatch.setattr(data_mod, "_check_image", lambda p: seen.append(p) or real(p))
    dash.study_run("big", 2, "0", 1, 2, "two")
    assert len(seen) <= 3
    study = json.loads((tmp_path / "studies" / "two" / "study.json").read_text())
    assert study["n_items"] == 2
