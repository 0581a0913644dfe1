"""Heatmaps checked against causal effects: deletion / insertion curves, their baselines, the
pointing game, and the knockout they run through (known answers, independent references)."""
import numpy as np
import pytest
import torch

from vlmlens.errors import InputError
from vlmlens.experiments.map_check import CurveScorer, MapScorer, _auc
from vlmlens.experiments.map_report import object_tokens, pointing_game
from vlmlens.interventions import PatchKnockout, PatchPrune, Truncate


def _keyed(key_tokens):
    """A measure whose answer is the share of the key tokens still present."""
    key = set(key_tokens)
    return lambda knocked: (len(key) - len(key & set(knocked))) / len(key)


def test_curves_of_a_known_dependence():
    # 16 tokens, 8 steps (2 tokens a step); the answer is the share of tokens {1, 5, 9, 13} left
    s = CurveScorer(16, _keyed([1, 5, 9, 13]), steps=8, n_random=19)
    best = np.zeros(16)
    best[[1, 5, 9, 13]] = [4, 3, 2, 1]
    c = s.check(best, "true effect")
    assert c.deletion["map"] == [1, 0.5, 0, 0, 0, 0, 0, 0, 0]
    assert c.insertion["map"] == [0, 0.5, 1, 1, 1, 1, 1, 1, 1]
    assert c.deletion["reverse"] == [1, 1, 1, 1, 1, 1, 1, 0.5, 0]
    # trapezoids by hand (dx = 1/8): (1 + .5)/16 + .5/16 = 0.125; the reverse 6/8 + 1.5/16 + .5/16 = 0.875
    assert c.auc["deletion"]["map"] == pytest.approx(0.125)
    assert c.auc["deletion"]["reverse"] == pytest.approx(0.875)
    assert c.auc["insertion"]["map"] == pytest.approx(0.875)
    assert c.verdict == {"deletion": "better than random", "insertion": "better than random"}
    assert c.auc["deletion"]["p"] == pytest.approx(1 / 20)          # no random order did as well
    assert "better than random" in c.statement and "0.12 vs" in c.statement
    worst = s.check(-best, "reversed map")
    assert worst.verdict == {"deletion": "worse than random", "insertion": "worse than random"}
    # the random orders are shared: the second map ran only its own cuts
    assert s.forwards <= len({k for o in [np.argsort(-best), np.argsort(best), *s._random] for k in s._cuts(o)})


def test_p_value_counts_random_orders_at_least_as_good():
    s = CurveScorer(12, _keyed([0, 7]), steps=4, n_random=9, seed=3)
    c = s.check(np.arange(12.0), "some map")
    nulls = [_auc(s.fractions, r) for r in c.random_curves["deletion"]]
    want = (1 + sum(n <= c.auc["deletion"]["map"] + 1e-12 for n in nulls)) / 10
    assert c.auc["deletion"]["p"] == pytest.approx(want)
    assert c.auc["deletion"]["random"] == pytest.approx(np.mean(nulls))


def test_a_flat_map_is_no_better_than_random_and_ties_are_not_raster_order():
    s = CurveScorer(64, _keyed(range(8)), steps=8, n_random=19)   # the answer lives in the first raster row
    c = s.check(np.zeros(64), "flat")
    assert c.verdict["deletion"] != "better than random"           # raster order would have found row 0 first
    assert sorted(s.order_of(np.zeros(64))[:8].tolist()) != list(range(8))


def test_bad_maps_and_budgets_are_refused():
    s = CurveScorer(16, _keyed([1]), steps=8, n_random=19, max_forwards=20)
    with pytest.raises(InputError, match="16 image tokens"):
        s.check(np.zeros(15))
    with pytest.raises(InputError, match="not finite"):
        s.check(np.full(16, np.nan))
    with pytest.raises(InputError, match="the limit is 20"):
        s.check(np.arange(16.0))
    assert s.forwards == 0                                          # refused before any forward
    with pytest.raises(InputError, match="steps"):
        CurveScorer(16, _keyed([1]), steps=1)


def test_pointing_game():
    v = np.zeros(16)
    v[[5, 6]] = [3.0, 1.0]
    v[0] = -2.0                                                      # negative mass never counts
    g = pointing_game(v, [5, 9])
    assert g["hit"] and g["peak"] == 5 and g["energy"] == pytest.approx(0.75) and g["area"] == pytest.approx(2 / 16)
    assert not pointing_game(v, [9])["hit"]
    with pytest.raises(InputError):
        pointing_game(v, [])


# ---- through the model ----------------------------------------------------------------------------

def _logits(tiny, image, prompt, ivs):
    from vlmlens.experiments.engine import Trial

    t = Trial(tiny, image, prompt, max_new_tokens=3)
    return t.score(ivs).step_logprobs


def test_knockout_equals_patch_prune_and_truncate_at_zero(tiny):
    from vlmlens.tiny.scenes import make_scene

    img, prompt = make_scene(1).image, "What color is the circle?"
    pp = PatchPrune(0.5, "grid", mode="mask")
    n = 64
    kept = set(np.unique(np.floor((np.arange(32) + 0.5) * n / 32).astype(int)).tolist())
    a = _logits(tiny, img, prompt, [pp])
    b = _logits(tiny, img, prompt, [PatchKnockout(sorted(set(range(n)) - kept))])
    assert torch.equal(a, b)
    c = _logits(tiny, img, prompt, [PatchKnockout(range(n))])
    d = _logits(tiny, img, prompt, [Truncate(0, "drop")])
    assert torch.allclose(c, d, atol=1e-5)
    with pytest.raises(InputError, match="out of range"):
        _logits(tiny, img, prompt, [PatchKnockout([n])])


def test_the_object_map_beats_random_and_its_shuffle_does_not(tiny):
    """A one-object scene: the answer (the object's colour) hangs on the object's patches (known
    from the scene), so a map that is the object ranks them first and beats every random order on
    deletion; the same map shuffled does not."""
    import vlmlens as vl
    from vlmlens.tiny.scenes import make_scene

    scene = make_scene(1, n_objects=1)
    o = scene.objects[0]
    prompt = f"What color is the {o.shape}?"
    run = vl.capture(tiny, scene.image, prompt, max_new_tokens=4)
    assert run.generated_text.strip() == o.color
    s = MapScorer(tiny, scene.image, prompt, max_new_tokens=4, steps=4)
    toks = object_tokens(run, o)
    assert 4 <= len(toks) <= 16
    truth = np.zeros(s.n_image)
    truth[toks] = 1.0
    c = s.check(truth, "the object")
    assert c.verdict["deletion"] == "better than random"
    assert c.deletion["map"][1] < 0.2 < c.auc["deletion"]["random"]
    shuffled = s.check(np.random.default_rng(7).permutation(truth), "the object, shuffled")
    assert shuffled.verdict["deletion"] == "no better than random"
    assert c.auc["deletion"]["map"] < shuffled.auc["deletion"]["map"]


def test_check_maps_report_pointing_and_figure(tiny):
    from vlmlens.experiments.map_report import asked_object, check_maps
    from vlmlens.figures.maps import fig_map_check
    from vlmlens.tiny.scenes import make_scene

    scene = make_scene(0)                                # one circle: a small yellow one at middle right
    assert asked_object(scene, "What color is the circle?").color == "yellow"
    assert asked_object(scene, "What color is the square?") is None           # two squares: not one object
    assert asked_object(scene, "Describe the image.") is None
    rep = check_maps(tiny, scene.image, "What color is the circle?", maps=[("attention", 0), ("patch lens", 4)],
                     max_new_tokens=4, steps=2, n_random=4, scene=scene)
    assert [c.name for c in rep.checks] == ["attention, layer 0", "patch lens, layer 4"]
    assert rep.obj == "a small yellow circle at middle right" and set(rep.pointing) == {c.name for c in rep.checks}
    g = rep.pointing["attention, layer 0"]
    assert g["area"] == pytest.approx(len(g["object_tokens"]) / 64) and 0 <= g["energy"] <= 1
    # shared random orders: 4 orders x 2 curves x 1 inner step, + the whole cut, + 2 maps x 2 orders x 2 curves at most
    assert rep.forwards <= 4 * 2 + 1 + 2 * 2 * 2
    md = rep.table().markdown()
    assert "| attention, layer 0 |" in md and "peak on the object" in md
    fig = fig_map_check(rep.checks)
    names = [t.name for t in fig.data]
    assert "attention, layer 0" in names and "random orders (mean ± sd)" in names
    drawn = next(t for t in fig.data if t.name == "attention, layer 0")
    assert list(drawn.y) == rep.checks[0].deletion["map"]


def test_maps_command(tmp_path, capsys):
    from vlmlens.cli import main

    out = tmp_path / "m"
    assert main(["maps", "--scene", "0", "--prompt", "What color is the circle?", "--maps", "attention@1",
                 "--steps", "2", "--random", "3", "--max-new-tokens", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the asked object: a small yellow circle at middle right" in text and "attention, layer 1" in text
    assert {p.name for p in out.iterdir()} == {"maps.json", "maps.csv", "fig_maps.html"}
    for bad, why in ((["--maps", "saliency"], "unknown map"), (["--maps", "attention@x"], "whole number"),
                     (["--maps", "attention@99"], "out of range"), (["--max-forwards", "3"], "the limit is 3")):
        assert main(["maps", "--scene", "0", "--prompt", "What color is the circle?", "--steps", "2", *bad]) == 2
        assert why in capsys.readouterr().err
    assert main(["maps", "--prompt", "What color is the circle?"]) == 2
    assert "--scene" in capsys.readouterr().err


def test_a_target_that_does_not_depend_on_the_image_is_untestable():
    s = CurveScorer(16, lambda knocked: 1.0 - 0.001 * len(knocked) / 16, steps=4, n_random=19)
    c = s.check(np.arange(16.0), "any map")
    assert c.verdict == {"deletion": "untestable", "insertion": "untestable"}
    assert "untestable" in c.statement and "does not depend on the image" in c.statement


def test_checked_maps_are_headlines_of_the_run(tiny):
    import vlmlens as vl
    from vlmlens.findings import findings
    from vlmlens.tiny.scenes import make_scene

    run = vl.capture(tiny, make_scene(0).image, "What color is the circle?", max_new_tokens=2)
    c = CurveScorer(16, _keyed([1, 5, 9, 13]), steps=8, n_random=19).check(np.arange(16.0)[::-1], "attention, layer 2")
    fs = [f for f in findings(run, extras={"map_checks": {c.name: c.to_json()}}) if f.key.startswith("map_check")]
    assert len(fs) == 1 and fs[0].status == "causal" and fs[0].text == c.statement
    assert fs[0].value == c.verdict and fs[0].title == "map check: attention, layer 2"
    assert not [f for f in findings(run) if f.key.startswith("map_check")]
