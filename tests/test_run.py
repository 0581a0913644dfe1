"""Run save/load: exact round trip, and rejection of malformed run directories."""
import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

import vlmlens as vl
from vlmlens.run import FORMAT_VERSION, Run, RunFormatError, TokenSpans


def make_run(L=3, H=2, d=8, n_sys=2, n_img=4, n_txt=3, n_gen=2, seed=0) -> Run:
    rng = np.random.default_rng(seed)
    n_prompt = n_sys + n_img + n_txt
    n_total = n_prompt + n_gen
    share = rng.random((L, H, n_total)).astype(np.float32)
    share[:, :, n_sys:n_sys + n_img] = np.nan
    return Run(
        meta={"model": "synthetic", "family": "llava", "n_layers": L, "prompt": "what?", "interventions": [{"kind": "x", "k": 1}]},
        tokens=[f"t{i}" for i in range(n_total)],
        token_ids=list(range(n_total)),
        spans=TokenSpans(n_prompt, n_total, tuple(range(n_sys, n_sys + n_img))),
        image_grid=(2, 2),
        generated_text="a b",
        token_logprobs=[-0.5, -1.25],
        image=Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
        arrays={
            "hidden_states": rng.standard_normal((L + 1, n_total, d)).astype(np.float16),
            "hidden_positions": np.arange(n_total, dtype=np.int64),
            "attention_to_image": share,
            "attention_maps": rng.random((L, n_gen + 1, n_img)).astype(np.float32),
            "map_positions": np.arange(n_prompt - 1, n_total, dtype=np.int64),
        },
    )


def test_round_trip_is_exact(tmp_path):
    run = make_run()
    vl.save_run(run, tmp_path / "r")
    back = vl.load_run(tmp_path / "r")
    assert back.meta == run.meta
    assert back.tokens == run.tokens and back.token_ids == run.token_ids
    assert back.spans == run.spans and back.image_grid == run.image_grid
    assert back.generated_text == run.generated_text and back.token_logprobs == run.token_logprobs
    assert np.array_equal(np.asarray(back.image), np.asarray(run.image))
    assert set(back.arrays) == set(run.arrays)
    for k, v in run.arrays.items():
        assert back.arrays[k].dtype == v.dtype
        assert np.array_equal(back.arrays[k], v, equal_nan=True), k


def test_spans_views():
    run = make_run()
    s = run.spans
    assert s.system == slice(0, 2) and s.image == slice(2, 6) and s.text == slice(6, 9) and s.generated == slice(9, 11)
    assert run.span_states("image").shape == (4, 4, 8)
    split = TokenSpans(10, 12, (2, 3, 5, 6))
    assert split.image == [slice(2, 4), slice(5, 7)]
    assert split.label_of(4) == "other" and split.label_of(8) == "text"


def test_save_refuses_non_run_directory(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a vlmlens run"):
        vl.save_run(make_run(), d)
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]


def test_save_failure_leaves_nothing(tmp_path):
    run = make_run()
    run.arrays["attention_maps"] = run.arrays["attention_maps"][:, :1]  # wrong shape
    with pytest.raises(RunFormatError, match="attention_maps"):
        vl.save_run(run, tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_run(tmp_path):
    vl.save_run(make_run(seed=0), tmp_path / "r")
    vl.save_run(make_run(seed=1), tmp_path / "r")
    back = vl.load_run(tmp_path / "r")
    assert np.array_equal(back.arrays["hidden_states"], make_run(seed=1).arrays["hidden_states"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.fixture
def saved(tmp_path):
    return vl.save_run(make_run(), tmp_path / "r")


@pytest.mark.parametrize("missing", ["run.json", "arrays.safetensors", "image.png"])
def test_missing_file_rejected(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(RunFormatError, match=f"missing {missing}"):
        vl.load_run(saved)


def test_wrong_version_rejected(saved):
    doc = json.loads((saved / "run.json").read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (saved / "run.json").write_text(json.dumps(doc))
    with pytest.raises(RunFormatError, match="format version"):
        vl.load_run(saved)


def test_pickle_payload_rejected(saved):
    (saved / "arrays.safetensors").write_bytes(pickle.dumps({"hidden_states": np.zeros(3)}))
    with pytest.raises(RunFormatError, match="not a valid safetensors"):
        vl.load_run(saved)


def test_wrong_shapes_rejected(saved, tmp_path):
    run = make_run()
    from safetensors.numpy import save_file

    arrays = dict(run.arrays)
    arrays["hidden_states"] = arrays["hidden_states"][:2]
    save_file(arrays, str(saved / "arrays.safetensors"))
    with pytest.raises(RunFormatError, match="hidden_states"):
        vl.load_run(saved)


def test_declared_shape_must_match(saved):
    doc = json.loads((saved / "run.json").read_text())
    doc["arrays"]["attention_maps"]["shape"] = [1, 1, 1]
    (saved / "run.json").write_text(json.dumps(doc))
    with pytest.raises(RunFormatError, match="attention_maps"):
        vl.load_run(saved)


def test_garbage_json_rejected(saved):
    (saved / "run.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="not valid JSON"):
        vl.load_run(saved)


def test_bad_spans_rejected(saved):
    doc = json.loads((saved / "run.json").read_text())
    doc["spans"]["image_positions"] = [5, 3]
    (saved / "run.json").write_text(json.dumps(doc))
    with pytest.raises(RunFormatError, match="sorted"):
        vl.load_run(saved)


def test_no_pickle_anywhere_in_package():
    import pathlib

    src = pathlib.Path(vl.__file__).parent
    # the one exception: smol-shapes' build reads the EfficientNet state dict that an installed
    # package ships (never a user's file), tensors only
    allowed = {src / "real" / "build.py"}
    offenders = [
        str(p) for p in src.rglob("*.py")
        if "import pickle" in p.read_text() or ("torch.load(" in p.read_text() and p not in allowed)
    ]
    assert offenders == []
    for p in allowed:
        lines = [l for l in p.read_text().splitlines() if "torch.load(" in l]
        assert lines and all("weights_only=True" in l for l in lines), lines


def test_load_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        vl.load_run(tmp_path / "nope")
    shutil.rmtree(tmp_path)


def test_one_span_vocabulary_for_numpy_and_torch():
    import torch

    from vlmlens.analysis.attention import QUERY_SPANS
    from vlmlens.interventions import Knockout
    from vlmlens.run import SPAN_VOCABULARY, TokenSpans, span_mask

    img = (2, 3, 4, 6, 7)                                   # two image blocks with a separator at 5
    spans = TokenSpans(n_prompt=11, n_total=14, image_positions=img)
    pos_np = np.arange(14)
    pos_t = torch.arange(14)
    is_img = np.isin(pos_np, img)
    for name in SPAN_VOCABULARY:
        a = span_mask(name, pos_np, is_image=is_img, first_image=2, last_image=7, n_prompt=11)
        b = span_mask(name, pos_t, is_image=torch.from_numpy(is_img), first_image=2, last_image=7, n_prompt=11)
        assert np.array_equal(a, b.numpy()), name
        assert np.array_equal(spans.positions(name), pos_np[a]), name
    assert spans.positions("system").tolist() == [0, 1] and spans.positions("text").tolist() == [8, 9, 10]
    assert spans.positions("reads_image").tolist() == [5, 8, 9, 10, 11, 12, 13]      # the separator can see the image
    assert 5 not in spans.positions("text")                                         # ... but is not prompt text
    assert set(Knockout.SPANS.values()) <= set(SPAN_VOCABULARY) and set(QUERY_SPANS.values()) <= set(SPAN_VOCABULARY)
