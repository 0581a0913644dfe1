"""Image downsampling to a pruning method's token budget (VTC-Bench's baseline): the smaller image
is the largest the processor turns into at most round(keep * n) tokens; its output and KL are the
model's on that image, scored on the original baseline's tokens (a plain forward as reference);
refused where the processor fixes the size, and by the lens itself."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmlens as vl
from vlmlens.capture import prepare_inputs
from vlmlens.errors import InputError
from vlmlens.experiments.downsample import _resized, _tokens, downsample_to
from vlmlens.interventions import Downsample

from tests._models import extend_inputs, random_lm

PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))


def test_the_largest_image_within_the_budget(big):
    lm = random_lm("qwen2_vl")
    for keep in (0.5, 0.25):
        small, m, n = downsample_to(lm, big, PROMPT, keep)
        want = int(round(keep * n))
        assert m == _tokens(lm, small, PROMPT) and m <= want < n
        assert small.size[0] < big.size[0] and abs(small.size[1] / small.size[0] - 96 / 128) < 0.05
        assert _tokens(lm, _resized(big, small.size[0] + 1), PROMPT) > want       # one pixel wider: over budget
    same, m, n = downsample_to(lm, big, PROMPT, 1.0)
    assert same.size == big.size and m == n


def test_compare_pruning_scores_the_baseline_tokens_on_the_smaller_image(big):
    from vlmlens.experiments.pruning import compare_pruning

    lm = random_lm("qwen2_vl")
    res = compare_pruning(lm, big, PROMPT, {"downsample:0.5": [Downsample(0.5)]}, max_new_tokens=3, latency=True,
                          repeats=1)
    ds = res.method("downsample:0.5")
    assert res.method("baseline").latency["total_saving"] == 0
    small, m, n = downsample_to(lm, big, PROMPT, 0.5)
    assert ds.image_rows == [m] * lm.n_layers and ds.image_kept == [] and 0 < ds.savings["total_saving"] < 1
    assert f"{small.size[0]}x{small.size[1]} px: {m} image tokens instead of {n}" in ds.description
    assert ds.latency["total_s"] > 0 and "end-to-end time saved" in res.markdown()
    # reference: plain forwards (no lens) over prompt + the baseline's tokens, on each image
    run = vl.capture(lm, big, PROMPT, max_new_tokens=3)
    gen_ids = run.token_ids[run.spans.n_prompt:]

    def logp(img):
        inputs, _, _ = prepare_inputs(lm, img, PROMPT)
        k = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = lm.model(**extend_inputs(inputs, gen_ids)).logits[0, k - 1:k - 1 + len(gen_ids)]
        return torch.log_softmax(out.double(), -1)

    p, q = logp(big), logp(small)
    kl = float((p.exp() * (p - q)).sum())
    assert ds.output_kl == pytest.approx(kl, rel=1e-3, abs=1e-5)


def test_refused_where_it_means_nothing(image, tiny, tmp_path):
    with pytest.raises(InputError, match="resizes every image to one size"):
        downsample_to(tiny, image, "What color is the circle?", 0.5)
    with pytest.raises(InputError, match="changes the input image itself"):
        vl.capture(tiny, image, "What color is the circle?", max_new_tokens=2, interventions=[Downsample(0.5)])
    with pytest.raises(InputError, match="fraction in"):
        Downsample(0.0).validate(4)
    from vlmlens.experiments.methods import parse_methods

    assert parse_methods("downsample:drop=75%", 4)["downsample:drop=75%"] == [Downsample(0.25)]
    # a study is refused once, up front, before its directory exists (not row by row)
    from pathlib import Path

    from vlmlens.data import load_dataset
    from vlmlens.experiments.dataset_study import dataset_study

    data = load_dataset(str(Path(__file__).resolve().parents[1] / "assets" / "datasets" / "shapes-mini"))
    with pytest.raises(InputError, match="one size"):
        dataset_study(tiny, data, tmp_path / "s", methods="downsample:0.5")
    assert not (tmp_path / "s").exists()
