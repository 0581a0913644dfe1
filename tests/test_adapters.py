"""Adapter folders are checked before peft builds anything (#25 items 2, 6, 7).

A 200-byte config must not allocate without bound, an adapter without (or with the wrong)
weights must not load "successfully", and every malformed file is one InputError naming it --
from the library, the command line (exit 2) and the dashboard's model loader alike.
"""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

import vlmlens as vl
from vlmlens.models.adapters import check_adapter, load_adapter
from vlmlens.errors import InputError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real rank-4 LoRA adapter of tiny-shapes' decoder, written by peft (B made non-zero)."""
    from vlmlens.experiments.recovery import RecoveryConfig, add_adapters

    lm = vl.load_model("tiny-shapes")
    pm = add_adapters(lm, RecoveryConfig(rank=4))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    d = tmp_path_factory.mktemp("adapter") / "good"
    pm.save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model():
    return vl.load_model("tiny-shapes").model


def _copy(good, tmp_path, name="a"):
    d = tmp_path / name
    shutil.copytree(good, d)
    return d


def _config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture()
def no_peft(monkeypatch):
    """peft must never be reached for a refused adapter (nothing allocated)."""
    import peft

    def boom(*a, **k):
        raise AssertionError("peft was asked to build a refused adapter")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", boom)


def test_a_good_adapter_loads_and_changes_the_model(good, tmp_path):
    lm = vl.load_model("tiny-shapes", adapter=good)
    base = vl.load_model("tiny-shapes")
    w0 = dict(base.model.named_parameters())
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, w0[n])]
    assert changed and all("language_model" in n for n in changed)
    assert check_adapter(base.model, good)["r"] == 4


@pytest.mark.parametrize("changes,msg", [
    ({"r": 200000}, r"rank r = 200,000 is larger than the smallest targeted projection"),
    ({"r": 10 ** 7}, r"rank r = 10,000,000 is larger"),
    ({"r": 0}, "must be a whole number >= 1"),
    ({"r": "8"}, "must be a whole number >= 1"),
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 10 ** 8}, "peft_type 'PROMPT_TUNING' is not supported"),
    ({"use_dora": True}, "use_dora = 'True' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4096}}, "rank_pattern"),
    ({"target_modules": ["nothing_here"]}, "match no linear layer"),
    ({"target_modules": []}, "target_modules must be"),
    ({"r": 8}, r"112 of the wrong shape .* expected \[8, 160\] for r = 8"),
])
def test_bad_configs_are_refused_before_any_allocation(good, tmp_path, model, no_peft, changes, msg):
    d = _copy(good, tmp_path)
    _config(d, **changes)
    with pytest.raises(InputError, match=msg):
        load_adapter(model, d)


def test_bad_weight_files_are_refused(good, tmp_path, model, no_peft):
    from safetensors import safe_open

    d = _copy(good, tmp_path, "list")
    (d / "adapter_config.json").write_text("[]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "pickle")
    (d / "adapter_model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(InputError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "truncated")
    raw = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "empty")
    save_file({}, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="holds no tensors"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "half")
    with safe_open(str(good / "adapter_model.safetensors"), "pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[: len(keys) // 2]}, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match=r"expected tensors missing"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "shape")
    bad = dict(tensors)
    bad[keys[0]] = torch.zeros(tensors[keys[0]].shape[0] + 1, tensors[keys[0]].shape[1])
    save_file(bad, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="of the wrong shape"):
        load_adapter(model, d)
    d = _copy(good, tmp_path, "extra")
    save_file({**tensors, "base_model.model.nowhere.lora_A.weight": torch.zeros(4, 4)}, str(d / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="tensors for no targeted module"):
        load_adapter(model, d)


def test_cli_and_dashboard_say_the_same(good, tmp_path, capsys):
    from vlmlens.cli import main
    from vlmlens.ui.model_holder import ModelHolder

    d = _copy(good, tmp_path)
    _config(d, r=10 ** 7)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 0, 0)).save(img)
    assert main(["capture", "--image", str(img), "--prompt", "What color?", "--adapter", str(d),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "rank r = 10,000,000 is larger" in last and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    holder = ModelHolder("tiny-shapes", device="cpu", adapter=d).start()
    holder._done.wait(120)
    assert holder.state != "ready" and "rank r = 10,000,000 is larger" in holder.status_markdown()
