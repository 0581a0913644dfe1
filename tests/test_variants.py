"""parse_variants: the one reading of what a study varies (depths, encoder x decoder grid, methods)."""
import pytest

from vlmlens.errors import InputError
from vlmlens.experiments.variants import parse_encoder_depths, parse_variants
from vlmlens.interventions import VTW, EncoderDepth, FastV, Truncate


def test_depths_plan_default_is_every_depth(tiny):
    L = tiny.n_layers
    plan = parse_variants(tiny)
    assert plan.kind == "depths" and plan.depths == list(range(L + 1)) and plan.methods is None
    assert [v.key for v in plan.variants] == [str(k) for k in range(L + 1)]
    assert plan.variants[-1].interventions == ()                      # depth L: the untouched model
    iv = plan.variants[0].interventions[0]
    assert isinstance(iv, Truncate) and iv.from_layer == 0 and iv.mode == "drop"


def test_depths_written_as_text_and_include_full(tiny):
    L = tiny.n_layers
    plan = parse_variants(tiny, depths="2, 0,2", mode="remove")
    assert plan.depths == [0, 2] and plan.variants[1].interventions[0].mode == "remove"
    assert parse_variants(tiny, depths="2,0", include_full=True).depths == [0, 2, L]
    with pytest.raises(InputError, match="out of range"):
        parse_variants(tiny, depths=[L + 1])
    with pytest.raises(InputError, match="unknown truncation mode"):
        parse_variants(tiny, depths="0", mode="cut")


def test_grid_plan_is_encoder_major(tiny):
    F = tiny.arch.vision_feature_depth(tiny.model)
    plan = parse_variants(tiny, depths="0,all", encoder_depths=f"{F}, 0")
    assert plan.kind == "grid" and plan.encoder_depths == [0, F]
    assert [v.key for v in plan.variants] == ["0,0", f"0,{tiny.n_layers}", f"{F},0", f"{F},{tiny.n_layers}"]
    first, last = plan.variants[0].interventions, plan.variants[-1].interventions
    assert isinstance(first[0], EncoderDepth) and first[0].layers == 0 and isinstance(first[1], Truncate)
    assert last == ()                                                  # all of the tower, all of the decoder
    for bad in ("x", [F + 1], [], [1.0], [True]):
        with pytest.raises(InputError, match=rf"encoder depths must be integers in 0\.\.{F}"):
            parse_encoder_depths(bad, F)


def test_methods_plan_written_or_given(tiny):
    plan = parse_variants(tiny, methods="fastv:1:0.5,vtw:2")
    assert plan.kind == "methods" and plan.method_names == ["fastv:1:0.5", "vtw:2"]
    assert [v.key for v in plan.variants] == ["baseline", "fastv:1:0.5", "vtw:2"]
    assert plan.variants[0].interventions == () and plan.variants[0].method == "baseline"
    assert isinstance(plan.variants[1].interventions[0], FastV) and plan.variants[2].interventions[0].layers == (2,)
    given = parse_variants(tiny, methods={"mine": [VTW(1)]})
    assert [v.key for v in given.variants] == ["baseline", "mine"]
    with pytest.raises(InputError):
        parse_variants(tiny, methods={"bad": [VTW(tiny.n_layers + 5)]})


def test_methods_refuse_depths_and_need_stages(tiny):
    with pytest.raises(InputError, match="not both"):
        parse_variants(tiny, depths="0", methods="vtw:1")
    with pytest.raises(InputError, match="not both"):
        parse_variants(tiny, encoder_depths="0", methods="vtw:1")
    with pytest.raises(InputError, match="causal stages"):
        parse_variants(tiny, methods="stages:0.5")
    labels = ["sink"] + ["fusion"] * (tiny.n_layers - 2) + ["discard"]
    plan = parse_variants(tiny, methods="stages:0.5", stage_labels=labels)
    assert plan.method_names == ["stages:0.5"]
