"""The README's code blocks run as written (in a scratch folder: tests never write tracked files).

The Python API block runs whole. Of the command-line block every line runs except ``study``
(264 s; its code path is tests/test_experiments.py's study tests) and ``make-cached-runs``
(it rewrites the shipped cached_runs/; tests/test_ui.py runs it into a temporary folder).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlmlens.models.loading import TINY_SHAPES_DIR

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NOT_RUN = ("vlmlens study", "make-cached-runs")

pytestmark = pytest.mark.skipif(not TINY_SHAPES_DIR.is_dir(), reason="the README's examples use tiny-shapes")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _scratch(tmp_path) -> Path:
    for name in ("assets", "cached_runs"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_python_api_block_runs(tmp_path):
    code = blocks("python")[0]
    cwd = tmp_path                   # an empty folder: the block finds the shipped scenes through vl.EXAMPLES
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (cwd / "runs" / "my-run" / "run.json").is_file()
    assert "sweep cliff [causal]: depth 4" in p.stdout and "three stages [causal]" in p.stdout, p.stdout


def test_video_block_runs(tmp_path):
    (code,) = [b for b in blocks("python") if "load_video" in b]
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["3", "(2,", "3)"], p.stdout


def test_command_line_block_runs(tmp_path):
    cli = next(b for b in blocks("bash") if "python -m vlmlens capture" in b)
    cwd = _scratch(tmp_path)
    ran = 0
    for line in cli.strip().splitlines():
        cmd = line.split("  #")[0].strip()
        if not cmd or any(x in cmd for x in NOT_RUN):
            continue
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", "vlmlens"], cmd
        p = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
        if argv[3] == "show":
            assert "headlines" in p.stdout and "[causal]" in p.stdout
        if argv[3] == "stages":
            assert "sink layers 0–6 · fusion layer 7" in p.stdout, p.stdout
        if argv[3] == "encoder":
            assert "| 0 | lost ✗ | lost ✗ | kept ✓ |" in p.stdout, p.stdout
        if argv[3] == "prune":
            assert "| fastv:2:0.5 | keep 50 % (drop 50 %) from layer 2 of the image tokens" in p.stdout, p.stdout
            assert "| four | yes (correct)" in p.stdout.split("| fastv:2:0.5 |")[1].splitlines()[0], p.stdout
            assert "| fastv:2:drop=0.5:step | keep 50 % (drop 50 %) from layer 2 of the image tokens, by the newest" \
                   " token's attention, re-ranked at every step" in p.stdout, p.stdout
        if argv[3] == "maps":
            assert "the asked object: a large red circle at middle right" in p.stdout, p.stdout
            assert "| attention, layer 4 |" in p.stdout and "random orders" in p.stdout, p.stdout
        ran += 1
    assert ran == 8


def test_study_block_runs(tmp_path):
    """The README's study commands: a study of the shipped dataset, its resume, and torchrun with
    2 processes giving the same rows."""
    block = next(b for b in blocks("bash") if "--data assets/datasets/shapes-mini" in b)
    cwd = _scratch(tmp_path)
    env = dict(_env(), OMP_NUM_THREADS="1")
    lines = [l.split("  #")[0].strip() for l in block.strip().splitlines() if l.strip()]
    assert len(lines) == 3
    for cmd in lines:
        argv = shlex.split(cmd)
        if argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", "--master-port", "29533", *argv[1:]]
        else:
            assert argv[:3] == ["python", "-m", "vlmlens"], cmd
            argv = [sys.executable, *argv[1:]]
        p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (cmd, p.stderr[-3000:])
        if "--resume" in cmd:
            assert "200 items" in p.stdout
    one = [json.loads(l) for l in (cwd / "studies" / "shapes-mini" / "results.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (cwd / "studies" / "shapes-mini-2p" / "results.jsonl").read_text().splitlines()]
    assert len(one) == 200 and [r["id"] for r in two] == [r["id"] for r in one]
    # the ranks' batches hold other rows than the single process's: outputs identical, KL to float noise
    for a, b in zip(one, two):
        for d, ca in a["depths"].items():
            cb = b["depths"][d]
            assert (ca["text"], ca["score"]) == (cb["text"], cb["score"])
            assert abs(ca["output_kl"] - cb["output_kl"]) <= 1e-4 + 1e-3 * abs(ca["output_kl"])
