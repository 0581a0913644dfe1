"""LoRA recovery: fresh adapters change nothing, training under truncation lowers the truncated
validation loss, gradients never reach image keys past layer k, adapters round-trip through
safetensors and load_model(adapter=...), the command writes its files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlmlens as vl
from vlmlens.cli import main
from vlmlens.errors import InputError
from vlmlens.experiments.batch import collate
from vlmlens.experiments.prefix import prepare
from vlmlens.experiments.recovery import (RecoveryConfig, add_adapters, batch_loss, decoder_targets, eval_loss,
                                          shapes_items, train_recovery)


@pytest.fixture()
def tiny():
    return vl.load_model("tiny-shapes")     # fresh per test: training modifies the model in place


def _logits(lm, items):
    preps = [prepare(lm, im, pr) for im, pr, *_ in items]
    inputs, _ = collate(lm, preps)
    with torch.no_grad():
        return lm.model(**inputs).logits


def test_fresh_adapters_leave_outputs_unchanged_and_only_touch_the_decoder(tiny):
    items = shapes_items(4, split="val")
    before = _logits(tiny, items)
    assert len(decoder_targets(tiny)) == 7 * tiny.n_layers
    pm = add_adapters(tiny, RecoveryConfig(rank=4))
    names = [n for n, _ in tiny.model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 7 * tiny.n_layers and all("vision_tower" not in n for n in names)
    assert torch.equal(_logits(tiny, items), before)             # LoRA B = 0 at initialisation
    tiny.model = pm.unload()
    assert torch.equal(_logits(tiny, items), before)


def test_training_under_truncation_lowers_the_truncated_validation_loss(tiny):
    val = shapes_items(32, split="val", seed=1)
    full, cut = eval_loss(tiny, val, tiny.n_layers), eval_loss(tiny, val, 2)
    assert cut > full + 0.1                  # the truncation is really applied in the loss
    cfg = RecoveryConfig(steps=40, batch_size=8, lr=3e-3, warmup=5)
    pm, log = train_recovery(tiny, 2, shapes_items(400), cfg, val_items=val)
    assert log.val_loss_before == pytest.approx(cut, rel=1e-5)     # batch size 8 here, 16 above: the same
    assert log.val_loss_after < 0.9 * log.val_loss_before, log
    assert log.trainable_parameters == sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    tiny.model = pm.unload()


def test_gradients_never_reach_image_keys_past_the_depth(tiny):
    k = 3
    items = shapes_items(4, split="val")
    preps = [prepare(tiny, im, pr) for im, pr, *_ in items]
    _, rows = collate(tiny, preps)
    image_cols = [np.flatnonzero(np.isin(r.positions, r.image_positions)) for r in rows]
    pm = add_adapters(tiny, RecoveryConfig(rank=4))
    grads, handles = {}, []
    for l, layer in enumerate(tiny.arch.decoder_layers(tiny.model)):
        for name in ("k_proj", "v_proj"):
            def hook(mod, args, out, l=l, name=name):
                out.register_hook(lambda g, l=l, name=name: grads.__setitem__((l, name), g.detach().clone()))
            handles.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        for depth in (k, tiny.n_layers):
            grads.clear()
            batch_loss(tiny, items, depth).backward()
            for (l, name), g in grads.items():
                img = torch.stack([g[b, torch.as_tensor(cols)].abs().max() for b, cols in enumerate(image_cols)]).max()
                if depth == k and l >= k:
                    assert float(img) == 0.0, (l, name)          # nothing past k reads the image keys
                else:
                    assert float(img) > 0.0, (depth, l, name)    # ... and the hook does see gradients
    finally:
        for h in handles:
            h.remove()
        tiny.model = pm.unload()


def test_adapters_round_trip_through_safetensors(tiny, tmp_path):
    cfg = RecoveryConfig(steps=3, batch_size=4, warmup=1)
    pm, _ = train_recovery(tiny, 4, shapes_items(16), cfg, out=tmp_path / "k4")
    files = sorted(p.name for p in (tmp_path / "k4").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "recovery.json"] or \
        files == ["adapter_config.json", "adapter_model.safetensors", "recovery.json"]
    items = shapes_items(3, split="val")
    trained = _logits(tiny, items)
    tiny.model = pm.unload()
    assert not torch.allclose(_logits(tiny, items), trained)     # training changed something
    loaded = vl.load_model("tiny-shapes", adapter=tmp_path / "k4")
    assert loaded.name == "tiny-shapes+k4"
    assert torch.allclose(_logits(loaded, items), trained, atol=1e-5)
    assert not any("lora_" in n for n, _ in loaded.model.named_modules())   # merged: the plain model's modules
    assert json.loads((tmp_path / "k4" / "recovery.json").read_text())["depth"] == 4
    with pytest.raises(InputError, match="not an adapter folder"):
        vl.load_model("tiny-shapes", adapter=tmp_path)
    # the dashboard loads it the same way (python app.py --adapter DIR)
    from vlmlens.ui.model_holder import ModelHolder

    holder = ModelHolder("tiny-shapes", device="cpu", adapter=tmp_path / "k4").start()
    holder._done.wait(120)
    assert holder.state == "ready" and holder.lm.name == "tiny-shapes+k4"
    assert torch.allclose(_logits(holder.lm, items), trained, atol=1e-5)


def test_recover_command(tmp_path, capsys):
    out = tmp_path / "rec"
    argv = ["recover", "--depths", "4", "--steps", "2", "--batch-size", "4", "--n-train", "16", "--n-eval", "2",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| family | k | untruncated | truncated at k | truncated + LoRA |" in text
    res = json.loads((out / "recovery.json").read_text())
    assert {r["family"] for r in res["rows"]} == {"single", "caption", "reasoning"} and res["depths"] == [4]
    assert (out / "k4" / "adapter_model.safetensors").is_file() and (out / "recovery.csv").is_file()
    assert main(argv) == 2                                        # a used --out is refused
    assert "is not an empty directory" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x"), "--data", "nothing.jsonl"]) == 2
