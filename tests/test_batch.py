"""Batched execution equals the batch-of-one path: every random family and tiny-shapes, images
of different sizes and prompts of different lengths, per-example interventions; a study run
batched gives the same lines; what cannot batch says why and runs one item at a time."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlens.cli import main
from vlmlens.data import load_dataset
from vlmlens.experiments.batch import BatchError, BatchTrial, batch_problem, collate, output_kl
from vlmlens.experiments.dataset_study import dataset_study
from vlmlens.experiments.engine import Trial, compare_outputs, truncation
from vlmlens.interventions import FastV, EncoderDepth, Freeze, Knockout, Substitute, Truncate
from vlmlens.models.tiny_random import FAMILIES

from ._models import random_lm, record_matrix
from .test_dataset_study import _Crash, small_manifest

PROMPTS = ["What is this?", "Describe the picture in a few words please", "Colour?"]


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, s, dtype=np.uint8)) for s in [(48, 48, 3), (32, 80, 3), (90, 40, 3)]]


def _check_equal(lm, pairs, variants, n_new, tol=1e-4):
    L = lm.n_layers
    bs = BatchTrial(lm, pairs, max_new_tokens=n_new, baseline=[truncation(L, "drop")])
    singles = [Trial(lm, im, pr, max_new_tokens=n_new, baseline=[truncation(L, "drop")]) for im, pr in pairs]
    for b, s in enumerate(singles):
        assert bs.baseline.generated_ids[b] == s.baseline.generated_ids
        assert bs.baseline.texts[b] == s.baseline.run.generated_text
    worst = 0.0
    for ivs in variants:
        v = bs.evaluate(ivs)
        for b, s in enumerate(singles):
            o = s.evaluate(ivs)
            assert v.generated_ids[b] == o.generated_ids, (ivs, b)
            T = len(s.baseline.generated_ids)
            assert v.step_logprobs[b].shape == o.step_logprobs[:T + 1].shape
            worst = max(worst, float((v.step_logprobs[b] - o.step_logprobs[:T + 1]).abs().max()))
            c = compare_outputs(s.baseline, o)
            assert output_kl(bs.baseline.step_logprobs[b], v.step_logprobs[b], T) == pytest.approx(
                c["output_kl"], rel=1e-3, abs=1e-5)
    assert worst <= tol
    return bs


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_equals_one_item_at_a_time_on_every_family(family):
    lm = random_lm(family)
    variants = [[Truncate(1)], [Truncate(0)], [Freeze(1)], [Knockout("last", "image")], [Substitute(1, 0)],
                [EncoderDepth(1), Truncate(1)]]
    if lm.arch.cross_attention:
        # Mllama: a per-token mask over image tiles, not aligned across padded examples by the lens
        with pytest.raises(BatchError, match="one example at a time"):
            BatchTrial(lm, list(zip(_images(), PROMPTS)), max_new_tokens=2)
        record_matrix(family, "batched == one at a time", True, "refused: the cross-attention mask is per example "
                      "(one example at a time)", refused=True)
        return
    if len(lm.arch.attention_layers(lm.model)) < lm.n_layers:
        # a hybrid stack: its linear layers would carry a state through the aligning padding
        with pytest.raises(BatchError, match="carry a state along the sequence"):
            BatchTrial(lm, list(zip(_images(), PROMPTS)), max_new_tokens=2)
        record_matrix(family, "batched == one at a time", True, "refused: linear layers carry a state through the "
                      "padding (one example at a time)", refused=True)
        return
    bs = _check_equal(lm, list(zip(_images(), PROMPTS)), variants, n_new=5)
    # the three prompts differ in length and (but for fixed-size towers) in image tokens: padding really happened
    assert len({r.n_prompt for r in bs.rows}) > 1


def test_a_batch_equals_one_item_at_a_time_on_tiny_shapes(tiny):
    lm = tiny
    ds = load_dataset("assets/datasets/shapes-mini/manifest.jsonl")
    items = [it for t in ("vqa", "caption", "cot") for it in [i for i in ds.items if i.task == t][:2]]
    bs = _check_equal(lm, [(it.image, it.prompt) for it in items], [[Truncate(2)], [Freeze(4)], [Truncate(6)]], 48)
    assert bs.reuse and len({r.n_prompt for r in bs.rows}) > 1
    # the test can fail: the same batch without the per-example position ids is measurably different
    with torch.no_grad():
        right = lm.model(**bs.inputs, position_ids=bs.position_ids).logits[:, -1]
        wrong = lm.model(**bs.inputs).logits[:, -1]
    assert float((right - wrong).abs().max()) > 1e-2


def test_what_cannot_batch_says_why():
    lm = random_lm("llava")
    pairs = list(zip(_images(), PROMPTS))
    bs = BatchTrial(lm, pairs, max_new_tokens=2)
    with pytest.raises(BatchError, match="takes the image rows out"):
        bs.evaluate([Truncate(1, "remove")])
    with pytest.raises(BatchError, match="reads attention"):
        bs.evaluate([FastV(1, 0.5)])
    assert "per example" in batch_problem(lm, bs.preps, [FastV(1, 0.5)])
    assert batch_problem(lm, bs.preps, [Truncate(1)]) is None
    # a batched lens records nothing: asking it to is refused, not silently wrong
    from vlmlens.lens import Lens, Plan, Recording

    plan = Plan.build([], lm.n_layers, 10, Recording(store="all"), [])
    with pytest.raises(RuntimeError, match="records nothing"):
        Lens.for_model(lm, plan, batch=bs.rows)
    # inputs that cannot be stacked: a stated reason
    preps = list(bs.preps)
    odd = type(preps[0])(**{**preps[0].__dict__, "inputs": {**preps[0].inputs, "pixel_values": torch.zeros(1, 3, 8, 8)}})
    with pytest.raises(BatchError, match="pixel_values.*different shapes"):
        collate(lm, [odd, preps[1]])


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _same_lines(a, b):
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x["baseline"] == y["baseline"]
        for k, cx in x["depths"].items():
            cy = y["depths"][k]
            assert (cx["text"], cx["score"], cx["answer_kept"]) == (cy["text"], cy["score"], cy["answer_kept"])
            assert cx["output_kl"] == pytest.approx(cy["output_kl"], rel=1e-3, abs=1e-5)


def test_a_batched_study_equals_the_one_at_a_time_study(tmp_path, tiny):
    ds = load_dataset(small_manifest(tmp_path, (5, 2, 2)))
    one = dataset_study(tiny, ds, tmp_path / "one", depths=[0, 4], max_new_tokens=32)
    four = dataset_study(tiny, ds, tmp_path / "four", depths=[0, 4], max_new_tokens=32, batch_size=4)
    _same_lines(_lines(tmp_path / "one" / "results.jsonl"), _lines(tmp_path / "four" / "results.jsonl"))
    assert four.execution == {"batch_size": 4, "batched_items": 9, "single_items": 0, "reasons": [], "failed_rows": 0}
    for r1, r4 in zip(one.rows, four.rows):
        assert (r1["task"], r1["depth"], r1["answer_kept"]) == (r4["task"], r4["depth"], r4["answer_kept"])
        assert r1["score"] == pytest.approx(r4["score"], abs=1e-9)
    # mode "remove" cannot batch: it runs one item at a time and the study says why
    rem = dataset_study(tiny, ds, tmp_path / "rem", depths=[0, 4], mode="remove", max_new_tokens=32, batch_size=4)
    assert rem.execution["batched_items"] == 0 and "takes the image rows out" in rem.execution["reasons"][0]
    assert json.loads((tmp_path / "rem" / "study.json").read_text())["execution"]["single_items"] == 9


def test_a_killed_batched_study_resumes_to_the_same_result(tmp_path, tiny):
    ds = load_dataset(small_manifest(tmp_path, (5, 0, 0)), task="vqa")
    dataset_study(tiny, ds, tmp_path / "full", depths=[0, 4], max_new_tokens=4, batch_size=2)

    def crash_after_first_batch(done, total, what):
        if done == 2:
            raise _Crash()
    with pytest.raises(_Crash):
        dataset_study(tiny, ds, tmp_path / "part", depths=[0, 4], max_new_tokens=4, batch_size=2,
                      progress=crash_after_first_batch)
    assert len((tmp_path / "part" / "results.rank0.jsonl").read_text().splitlines()) == 2   # the whole first batch
    seen = []
    dataset_study(tiny, ds, tmp_path / "part", depths=[0, 4], max_new_tokens=4, batch_size=2, resume=True,
                  progress=lambda d, t, w: seen.append(t))
    assert seen[-1] == 3
    _same_lines(_lines(tmp_path / "part" / "results.jsonl"), _lines(tmp_path / "full" / "results.jsonl"))


def test_cli_batch_size(tmp_path, capsys):
    data = small_manifest(tmp_path, (3, 0, 0))
    base = ["study", "--model", "random:llava", "--data", str(data), "--task", "vqa", "--depths", "0,1",
            "--max-new-tokens", "2"]
    assert main([*base, "--batch-size", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "batch size must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*base, "--batch-size", "2", "--out", str(tmp_path / "ok")]) == 0
    assert "batch size 2" in capsys.readouterr().out
