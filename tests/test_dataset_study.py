"""Studies on a dataset: scores equal independent comparisons, a killed run resumes to the same
result, two torchrun processes (gloo, CPU) merge to the single-process result, bad input is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vlmlens as vl
from vlmlens.cli import main
from vlmlens.data import load_dataset
from vlmlens.errors import InputError
from vlmlens.experiments.compare import compare
from vlmlens.experiments.dataset_study import dataset_study, merge
from vlmlens.interventions import Truncate
from vlmlens.metrics import vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "datasets" / "shapes-mini" / "manifest.jsonl"


def small_manifest(tmp_path, per_task=(4, 1, 1)) -> Path:
    """The first rows of the shipped example dataset of each task, copied with their images."""
    rows = [json.loads(l) for l in SHIPPED.read_text().splitlines()]
    pick = []
    for task, n in zip(("vqa", "caption", "cot"), per_task):
        pick += [r for r in rows if r["task"] == task][:n]
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    for r in pick:
        shutil.copy(SHIPPED.parent / r["image"], d / r["image"])
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pick))
    return d / "manifest.jsonl"


def test_the_shipped_example_dataset_reads_clean():
    ds = load_dataset(SHIPPED)
    assert len(ds) == 200 and not ds.skipped
    assert {it.task for it in ds.items} == {"vqa", "caption", "cot"}


def test_scores_equal_independent_comparisons(tiny, tmp_path):
    ds = load_dataset(small_manifest(tmp_path))
    res = dataset_study(tiny, ds, tmp_path / "out", depths=[0, 4], max_new_tokens=48)
    assert res.n_items == 6 and {r["task"] for r in res.rows} == {"vqa", "caption", "cot"}
    recs = [json.loads(l) for l in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [it.id for it in ds.items]
    for item, rec in zip(ds.items[:2], recs):            # two vqa items against compare() run here
        c = compare(tiny, item.image, item.prompt, [0, 4], max_new_tokens=48)
        assert rec["baseline"] == c.baseline_text
        for d in c.depths:
            got = rec["depths"][str(d.depth)]
            assert got["text"] == d.text and got["answer_kept"] == d.answer_kept
            assert abs(got["output_kl"] - d.output_kl) <= 1e-6
            assert got["score"] == vqa_accuracy(d.text, item.answers)
    vqa8 = next(r for r in res.rows if r["task"] == "vqa" and r["depth"] == 8)
    want = sum(r["depths"]["8"]["score"] for r in recs if r["task"] == "vqa") / 4
    assert vqa8["score"] == pytest.approx(want) and vqa8["ci_low"] <= vqa8["score"] <= vqa8["ci_high"]
    cap = next(r for r in res.rows if r["task"] == "caption" and r["depth"] == 8)
    assert cap["cider_d"] is not None and res.caption_tokenizer
    assert (tmp_path / "out" / "study.csv").read_text().startswith("task,encoder_depth,depth,method,n,score")


class _Crash(Exception):
    pass


def test_a_killed_study_resumes_to_the_same_result(tiny, tmp_path):
    ds = load_dataset(small_manifest(tmp_path, (5, 0, 0)), task="vqa")
    full = dataset_study(tiny, ds, tmp_path / "full", depths=[0, 4], max_new_tokens=4)

    def crash_after_two(done, total, what):
        if done == 2:
            raise _Crash()
    with pytest.raises(_Crash):
        dataset_study(tiny, ds, tmp_path / "part", depths=[0, 4], max_new_tokens=4, progress=crash_after_two)
    f = tmp_path / "part" / "results.rank0.jsonl"
    assert len(f.read_text().splitlines()) == 2
    with open(f, "a") as fh:
        fh.write('{"id": "torn')                          # a line torn by the crash
    seen = []
    res = dataset_study(tiny, ds, tmp_path / "part", depths=[0, 4], max_new_tokens=4, resume=True,
                        progress=lambda d, t, w: seen.append(t))
    assert seen and seen[-1] == 3                         # only the 3 missing items ran
    assert (tmp_path / "part" / "results.jsonl").read_text() == (tmp_path / "full" / "results.jsonl").read_text()
    assert res.rows == full.rows
    # resuming with other arguments, or writing into a used directory, is refused with the reason
    with pytest.raises(InputError, match=r"other arguments \(depths: \[0, 4, 8\] there, \[0, 2, 8\] now"):
        dataset_study(tiny, ds, tmp_path / "part", depths=[0, 2], max_new_tokens=4, resume=True)
    with pytest.raises(InputError, match="is not empty; add --resume"):
        dataset_study(tiny, ds, tmp_path / "part", depths=[0, 4], max_new_tokens=4)
    with pytest.raises(InputError, match="holds no study"):
        dataset_study(tiny, ds, tmp_path / "nothing", depths=[0, 4], max_new_tokens=4, resume=True)
    assert merge(tmp_path / "part", ds, res.config).rows == full.rows


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def test_torchrun_two_processes_merge_to_the_single_process_result(tmp_path):
    data = small_manifest(tmp_path, (5, 0, 0))
    args = ["-m", "vlmlens", "study", "--model", "random:llava", "--data", str(data), "--task", "vqa",
            "--depths", "0,1", "--max-new-tokens", "3"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", *args, "--out", str(tmp_path / "two")], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [len((tmp_path / "two" / f"results.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert ranks == [3, 2]                                # rank-strided shards
    assert (tmp_path / "two" / "results.jsonl").read_text() == (tmp_path / "one" / "results.jsonl").read_text()
    a, b = (json.loads((tmp_path / d / "study.json").read_text()) for d in ("one", "two"))
    assert a["rows"] == b["rows"]


def test_cli_bad_input(tmp_path, capsys):
    data = small_manifest(tmp_path, (2, 0, 0))
    base = ["study", "--model", "random:llava", "--data", str(data), "--depths", "0,1", "--max-new-tokens", "2"]
    assert main([*base, "--task", "translate", "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'translate'" in capsys.readouterr().err
    assert main([*base, "--task", "vqa"]) == 2
    assert "--data needs --out" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert main([*base, "--task", "vqa", "--out", str(tmp_path / "used")]) == 2
    assert "is not empty; add --resume" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "../../etc/passwd", "question": "q", "answer": "a"}) + "\n")
    assert main(["study", "--model", "random:llava", "--data", str(bad), "--task", "vqa", "--out",
                 str(tmp_path / "o2"), "--on-bad-row", "fail"]) == 2
    assert "image path leaves the dataset folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
    assert main([*base, "--task", "vqa", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "| vqa |" in out and (tmp_path / "ok" / "study.json").is_file()


def test_the_real_photo_example_runs_every_task(tmp_path):
    """The shipped photos (VQA with ten answers, multiple choice, captions) through a study of a
    random LLaVA: every task gets its metric (the numbers mean nothing for random weights)."""
    from tests._models import random_lm

    ds = load_dataset(ROOT / "assets" / "datasets" / "photos" / "manifest.jsonl")
    assert len(ds) == 12 and not ds.skipped and all(len(it.answers) == 10 for it in ds.items if it.task == "vqa")
    res = dataset_study(random_lm("llava"), ds, tmp_path / "s", depths=[0], max_new_tokens=3)
    by = {(r["task"], r["depth"]): r for r in res.rows}
    assert set(by) == {(t, d) for t in ("vqa", "mc", "caption") for d in (0, 2)}
    assert by[("caption", 2)]["cider_d"] is not None and by[("caption", 2)]["bleu_4"] is not None
    recs = [json.loads(x) for x in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert all(r["depths"]["2"]["score"] in (0.0, 1.0) for r in recs if r["task"] == "mc")


def test_a_pruning_study_over_a_dataset(tiny, tmp_path, capsys):
    """--methods makes the study compare token-pruning methods (with the compute each saves)
    instead of depths; each cell equals a capture under that method."""
    from vlmlens.interventions import FastV

    data = small_manifest(tmp_path, (3, 0, 1))
    ds = load_dataset(data)
    res = dataset_study(tiny, ds, tmp_path / "p", methods="fastv:2:0.5,vtw:4", max_new_tokens=48)
    assert res.config["methods"] == ["fastv:2:0.5", "vtw:4"]
    by = {(r["task"], r["method"]): r for r in res.rows}
    assert set(by) == {(t, m) for t in ("vqa", "cot") for m in ("baseline", "fastv:2:0.5", "vtw:4")}
    assert by[("vqa", "baseline")]["total_saving"] == 0 and by[("vqa", "fastv:2:0.5")]["total_saving"] > 0.2
    assert by[("vqa", "vtw:4")]["total_saving"] > by[("vqa", "fastv:2:0.5")]["total_saving"] * 0.5
    rec = json.loads((tmp_path / "p" / "results.jsonl").read_text().splitlines()[0])
    run = vl.capture(tiny, ds.items[0].image, ds.items[0].prompt, max_new_tokens=48, interventions=[FastV(2, 0.5)])
    assert rec["methods"]["fastv:2:0.5"]["text"] == run.generated_text
    assert rec["methods"]["fastv:2:0.5"]["image_rows"] == run.arrays["image_rows"].tolist()
    assert "| fastv:2:0.5 |" in res.markdown() and "decoder FLOPs saved" in res.markdown()
    from vlmlens.figures import fig_dataset_study

    assert {t.name for t in fig_dataset_study(res).data} >= {"FastV", "VTW (fixed depth)", "baseline"}
    assert main(["study", "--data", str(data), "--methods", "fastv:2:0.5", "--depths", "0,4", "--out",
                 str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err


def test_an_encoder_by_decoder_grid_over_a_dataset(tiny, tmp_path):
    """--encoder-depths with --depths: every (m, k) per row; each cell equals a capture under
    EncoderDepth(m) + Truncate(k); the m = F row is the decoder-only study."""
    from vlmlens.interventions import EncoderDepth

    ds = load_dataset(small_manifest(tmp_path, (2, 0, 0)))
    res = dataset_study(tiny, ds, tmp_path / "g", depths=[2, 8], encoder_depths="1,4", mode="remove", max_new_tokens=4)
    assert res.config["encoder_depths"] == [1, 4] and res.config["feature_depth"] == 4
    keys = {(r["encoder_depth"], r["depth"]) for r in res.rows}
    assert keys == {(1, 2), (1, 8), (4, 2), (4, 8)}
    rec = json.loads((tmp_path / "g" / "results.jsonl").read_text().splitlines()[0])
    run = vl.capture(tiny, ds.items[0].image, ds.items[0].prompt, max_new_tokens=4,
                     interventions=[EncoderDepth(1), Truncate(2, "remove")])
    assert rec["grid"]["1,2"]["text"] == run.generated_text
    plain = dataset_study(tiny, ds, tmp_path / "d", depths=[2, 8], mode="remove", max_new_tokens=4)
    for r in plain.rows:
        g = next(x for x in res.rows if x["encoder_depth"] == 4 and x["depth"] == r["depth"])
        assert g["score"] == r["score"] and g["answer_kept"] == r["answer_kept"]
    assert "| 1 |" in res.markdown() and "m \\ k" in res.markdown()
    with pytest.raises(InputError, match=r"encoder depths must be integers in 0\.\.4"):
        dataset_study(tiny, ds, tmp_path / "bad", encoder_depths="9", max_new_tokens=2)
