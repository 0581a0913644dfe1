"""Model folders that used to give a traceback or the wrong reason (#25 items 7, 9): each is one
UnsupportedModel (an InputError) saying what is wrong with which file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmlens as vl
from vlmlens.errors import InputError
from vlmlens.models.loading import BUILTIN

TINY = BUILTIN["tiny-shapes"]


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(TINY, d)
    return d


def _cfg(d, change):
    doc = json.loads((d / "config.json").read_text())
    change(doc)
    (d / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("offline", [False, True])
def test_broken_configs_say_why_also_offline(folder, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(InputError, match="config.json is not valid JSON") as e:
        vl.load_model(str(folder))
    assert "offline" not in str(e.value)
    _cfg_ok = json.loads((TINY / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in _cfg_ok.items() if k != "model_type"}))
    with pytest.raises(InputError, match="has no model_type"):
        vl.load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(dict(_cfg_ok, auto_map={"AutoConfig": "x.Y"})))
    with pytest.raises(InputError, match="names its own code .* --trust-remote-code"):
        vl.load_model(str(folder))


def test_weight_files(folder):
    st = next(folder.glob("*.safetensors"))
    tensors = load_file(str(st))
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    bad = dict(tensors)
    bad[name] = torch.zeros(bad[name].shape[0] + 1, bad[name].shape[1])
    save_file(bad, str(st), metadata={"format": "pt"})
    with pytest.raises(InputError, match="cannot load the weights of"):
        vl.load_model(str(folder))
    raw = (folder / st.name).read_bytes()
    save_file(tensors, str(st), metadata={"format": "pt"})
    (folder / st.name).write_bytes((folder / st.name).read_bytes()[: len(raw) // 2])
    with pytest.raises(InputError, match="cannot load the weights of"):
        vl.load_model(str(folder))
    st.unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pickled weights only .*pytorch_model.bin.* never unpickles"):
        vl.load_model(str(folder))


def test_an_unreachable_hub_fails_fast_and_says_what_to_do(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # a closed local port: no hub
    t0 = time.monotonic()
    with pytest.raises(InputError, match="cannot be reached; download the model elsewhere and give its folder"):
        vl.load_model("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - t0 < 10
