"""A study directory is owned by one process at a time (#25 item 1).

Two studies on one ``--out`` used to interleave: the second replaced the rank file the first was
still appending to, and a row vanished. Now the second start is refused, naming the holder; a
lock left by a killed process is taken over (and said); the lock goes when its study ends.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vlmlens.data import load_dataset
from vlmlens.errors import InputError
from vlmlens.experiments.dataset_study import dataset_study
from vlmlens.experiments.study_files import LOCK, StudyLock

from tests.test_dataset_study import ROOT, small_manifest


def _lock(out, pid, job="someone-else"):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "job": job,
                                        "started": "2026-01-01T00:00:00", "command": "python -m vlmlens study ..."}))


def _rows(out):
    return [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]


def test_a_live_holder_is_named_and_nothing_is_touched(tiny, tmp_path):
    ds = load_dataset(small_manifest(tmp_path, (3, 0, 0)))
    out = tmp_path / "out"
    dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4)            # a finished study
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(out, holder.pid)
        with pytest.raises(InputError, match=f"in use by another study: PID {holder.pid} on {socket.gethostname()}"):
            dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4, resume=True)
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK}
        assert after == {k: v for k, v in before.items()}                 # nothing written, nothing replaced
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_and_said(tiny, tmp_path):
    ds = load_dataset(small_manifest(tmp_path, (3, 0, 0)))
    clean = dataset_study(tiny, ds, tmp_path / "clean", depths=[0], max_new_tokens=4)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                                           # a PID that is not running
    # what a study killed after its first row leaves: its config, one row, its lock
    out = tmp_path / "out"
    _lock(out, gone.pid)
    (out / "config.json").write_text((tmp_path / "clean" / "config.json").read_text())
    first = (tmp_path / "clean" / "results.rank0.jsonl").read_text().splitlines()[0]
    (out / "results.rank0.jsonl").write_text(first + "\n")
    with pytest.raises(InputError, match="not empty"):                   # a fresh start still refuses a used dir
        dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4)
    notes = []
    res = dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4, resume=True, log=notes.append)
    assert len(notes) == 1 and f"from PID {gone.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (out / LOCK).exists()                                     # released at the end
    assert _rows(out) == _rows(tmp_path / "clean")                       # every row once, as a clean run
    assert [r["score"] for r in res.rows] == [r["score"] for r in clean.rows]


def test_the_lock_is_released_when_the_study_fails(tiny, tmp_path):
    ds = load_dataset(small_manifest(tmp_path, (2, 0, 0)))
    out = tmp_path / "out"

    def crash(*a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4, progress=crash)
    assert not (out / LOCK).exists()
    lock = StudyLock(out, "me")
    assert lock.acquire() is None and (out / LOCK).exists()
    StudyLock(out, "me").check()                                          # the same job may pass
    with pytest.raises(InputError, match="in use by another study"):
        StudyLock(out, "other").acquire()
    lock.release()
    assert not (out / LOCK).exists()


def test_two_commands_on_one_out(tmp_path):
    """The issue's report, as a user runs it: the second start is refused while the first runs,
    and the first finishes with every row once, as a clean run gives them."""
    data = small_manifest(tmp_path, (60, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    base = [sys.executable, "-m", "vlmlens", "study", "--data", str(data), "--depths", "0,4",
            "--max-new-tokens", "24"]
    out = tmp_path / "x"
    first = subprocess.Popen([*base, "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / LOCK).exists() and first.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    # The first is paused (a live process, as one busy on a long row is) while the second starts, so
    # a fast host cannot finish the first study before the second looks at the directory.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None and (out / LOCK).exists(), "the first study ended before it could be paused"
        second = subprocess.run([*base, "--out", str(out), "--resume"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _out, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert "in use by another study" in second.stderr, second.stderr[-500:]
    assert second.returncode == 2 and f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert "Loading weights" not in second.stderr           # refused before it loaded the model
    rows = _rows(out)
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    assert not (out / LOCK).exists()


def _bad_rows_manifest(tmp_path):
    """Three good rows, an 81 MP image (skipped when the dataset is read: too many pixels) and two
    rows that load but cannot run: a question over the prompt limit, a lone surrogate in it."""
    from PIL import Image

    src = small_manifest(tmp_path, (3, 0, 0))
    rows = [json.loads(l) for l in src.read_text().splitlines()]
    Image.new("1", (9000, 9000)).save(src.parent / "images" / "huge.png")
    good = rows[0]
    rows += [dict(good, id="huge", image="images/huge.png"), dict(good, id="long", question="why " * 6000),
             dict(good, id="surrogate", question="What is \ud800 this?")]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_rows_that_cannot_run_are_recorded_skipped_and_resumed_past(tiny, tmp_path, capsys):
    from vlmlens.cli import main

    data = _bad_rows_manifest(tmp_path)
    ds = load_dataset(data)
    assert len(ds) == 5 and ds.skipped[0]["row"] == 4 and "image too large" in ds.skipped[0]["reason"]
    out = tmp_path / "out"
    res = dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4, batch_size=2)
    by_id = {b["id"]: b for b in res.failed}
    assert set(by_id) == {"long", "surrogate"} and res.n_items == 3
    assert [by_id[i]["row"] for i in ("long", "surrogate")] == [5, 6]
    assert "characters" in by_id["long"]["reason"] and "lone surrogate" in by_id["surrogate"]["reason"]
    assert [r["id"] for r in _rows(out)] == [it.id for it in ds.items[:3]]
    lines = (out / "results.rank0.jsonl").read_text()
    again = dataset_study(tiny, ds, out, depths=[0], max_new_tokens=4, resume=True)
    assert (out / "results.rank0.jsonl").read_text() == lines             # nothing ran again
    assert again.failed == res.failed
    with pytest.raises(InputError, match=r"row 5 \(id 'long'\) could not run"):
        dataset_study(tiny, ds, tmp_path / "strict", depths=[0], max_new_tokens=4, on_bad_row="fail")
    argv = ["study", "--data", str(data), "--depths", "0", "--max-new-tokens", "4"]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    text = capsys.readouterr().out
    assert "row 6 could not run: prompt is not valid Unicode text" in text
    assert main([*argv, "--out", str(tmp_path / "cli2"), "--on-bad-row", "fail"]) == 2
    assert "row 4: image too large" in capsys.readouterr().err        # --on-bad-row fail: the first bad row, named
