"""The shipped tiny-shapes checkpoint: offline loading, accuracy, robustness.

They run whenever ``assets/tiny-shapes-vlm/`` exists and FAIL if it is broken or below the
quality bar. While the checkpoint has not been shipped yet (the directory is absent; see the
open issue for the embedded model) the module is skipped with that reason printed, never
counted as passing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlmlens.tiny.scenes import blank_image
from vlmlens.tiny.tasks import split_examples

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "assets" / "tiny-shapes-vlm"
pytestmark = pytest.mark.skipif(
    not CKPT.exists(), reason="tiny-shapes checkpoint not shipped yet (assets/tiny-shapes-vlm absent)"
)


@pytest.fixture(scope="module")
def loaded():
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(2)
    processor = AutoProcessor.from_pretrained(str(CKPT))
    model = LlavaForConditionalGeneration.from_pretrained(str(CKPT)).eval()
    return model, processor


def test_checkpoint_files_and_size():
    names = {p.name for p in CKPT.iterdir()}
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "processor_config.json", "README.md"):
        assert f in names, f
    assert not any(n.endswith(".bin") for n in names)
    total = sum(p.stat().st_size for p in CKPT.iterdir() if p.is_file())
    assert total <= 30 * 1024 * 1024, total


def test_architecture(loaded):
    model, processor = loaded
    cfg = model.config
    assert cfg.model_type == "llava"
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.vision_config.image_size == 64 and cfg.vision_config.patch_size == 8
    assert cfg.vision_feature_select_strategy == "default"
    tok = processor.tokenizer
    assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert type(processor).__name__ == "LlavaProcessor"


def test_loads_offline_in_a_fresh_process():
    code = (
        "import sys, torch\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "from PIL import Image\n"
        "d = sys.argv[1]\n"
        "p = AutoProcessor.from_pretrained(d)\n"
        "m = LlavaForConditionalGeneration.from_pretrained(d).eval()\n"
        "msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'How many objects are there?'}]}]\n"
        "t = p.apply_chat_template(msgs, add_generation_prompt=True)\n"
        "x = p(images=[Image.open(sys.argv[2])], text=t, return_tensors='pt')\n"
        "g = m.generate(**x, max_new_tokens=5, do_sample=False)\n"
        "print('ANSWER=' + p.tokenizer.decode(g[0, x['input_ids'].shape[1]:], skip_special_tokens=True))\n"
    )
    meta = json.loads((ROOT / "assets" / "examples" / "prompts.json").read_text())
    ex = next(e for e in meta["examples"] if len(e["truth"]["objects"]) == 3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(ROOT / ".scratch" / "no-hf-home"),
               OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code, str(CKPT), str(ROOT / "assets" / "examples" / ex["file"])],
                         capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ANSWER=three" in out.stdout, out.stdout


def _answers(model, processor, images, prompts, max_new_tokens=4):
    from vlmlens.tiny.eval import generate

    return generate(model, processor, images, prompts, max_new_tokens=max_new_tokens, batch_size=64)


def test_single_token_accuracy_on_fixed_test_sample(loaded):
    model, processor = loaded
    exs = split_examples("single", 50, offset=1000)
    preds = _answers(model, processor, [e.scene.image for e in exs], [e.prompt for e in exs])
    acc = np.mean([p == e.answer for p, e in zip(preds, exs)])
    assert acc >= 0.90, list(zip([e.prompt for e in exs], [e.answer for e in exs], preds))


def test_generation_stops_at_eos(loaded):
    model, processor = loaded
    exs = split_examples("single", 6, offset=2000)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.prompt}]}],
        add_generation_prompt=True) for e in exs]
    eos = processor.tokenizer.convert_tokens_to_ids("</s>")
    for e, t in zip(exs, texts):
        x = processor(images=[e.scene.image], text=t, return_tensors="pt")
        g = model.generate(**x, max_new_tokens=20, do_sample=False)[0, x["input_ids"].shape[1]:].tolist()
        assert eos in g and len(g) <= 3, g  # one word, then </s>


def test_blank_image_breaks_the_answers(loaded):
    """The model must look at the image: with a blank image, color questions fail."""
    model, processor = loaded
    exs = [e for e in split_examples("single", 120, offset=3000) if e.kind in ("color", "shape", "count")][:30]
    real = _answers(model, processor, [e.scene.image for e in exs], [e.prompt for e in exs])
    blank = _answers(model, processor, [blank_image()] * len(exs), [e.prompt for e in exs])
    acc_real = np.mean([p == e.answer for p, e in zip(real, exs)])
    acc_blank = np.mean([p == e.answer for p, e in zip(blank, exs)])
    assert acc_real >= 0.85 and acc_blank <= 0.5, (acc_real, acc_blank)


def test_arbitrary_images_do_not_crash(loaded):
    from PIL import Image

    model, processor = loaded
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 255, (128, 96), dtype=np.uint8), "L").convert("RGB")
    photo_like = Image.new("RGBA", (517, 233), (120, 30, 200, 90))
    preds = _answers(model, processor, [noise, gray, photo_like],
                     ["What color is the circle?", "Describe the image.", "is there a zebra here?"],
                     max_new_tokens=12)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)
    vocab_words = set(processor.tokenizer.get_vocab())
    for p in preds:  # whatever it says, it says it in its own vocabulary
        for w in processor.tokenizer.tokenize(p):
            assert w in vocab_words


def test_capture_through_the_library_maps_image_tokens_to_the_8x8_grid(tiny):
    """vl.capture on the shipped model: 64 image tokens on an 8x8 grid, in raster order. Known
    answer: in one-object scenes, the image token whose layer-0 state (the projector output)
    is farthest from the background's median lies on the object."""
    import vlmlens as vl
    from vlmlens.tiny.scenes import _RADIUS, make_scene

    lm = tiny
    for seed in range(6):
        scene = make_scene(seed, n_objects=1)
        obj = scene.objects[0]
        run = vl.capture(lm, scene.image, f"What color is the {obj.shape}?", max_new_tokens=2)
        assert run.generated_text.strip() == obj.color
        assert run.image_grid == (8, 8) and run.spans.n_image == 64
        img = run.spans.positions("image")
        assert np.array_equal(img, np.arange(img[0], img[0] + 64))
        h = run.hidden_states[0][img].astype(np.float32)          # [64, d]
        dist = np.linalg.norm(h - np.median(h, axis=0), axis=1)
        grid = run.to_grid(dist)
        i, j = np.unravel_index(np.nanargmax(grid), grid.shape)
        cx, cy, r = (j + 0.5) * 8, (i + 0.5) * 8, _RADIUS[obj.size] + 4
        assert abs(cx - obj.x) <= r and abs(cy - obj.y) <= r, (seed, (i, j), (obj.x, obj.y))


def test_unknown_words_are_named_in_the_run_and_the_overview(tiny):
    import vlmlens as vl
    from vlmlens.ui.panels import generation_markdown
    from vlmlens.ui.store import RunStore

    lm = tiny
    image = Path(__file__).resolve().parents[1] / "assets" / "examples" / "shapes_03.png"
    run = vl.capture(lm, image, "How many objects are there? Think step by step.", max_new_tokens=2)
    assert run.meta["unknown_words"] == ["Think", "step", "by", "step."]
    md = generation_markdown(RunStore().add(run, label="x"))
    assert "does not know «Think», «step», «by», «step.»" in md
    assert "unknown_words" not in vl.capture(lm, image, "How many objects are there?", max_new_tokens=2).meta


def test_the_dashboard_warns_when_tiny_shapes_sees_a_picture_from_elsewhere(tmp_path, tiny):
    from PIL import Image

    from vlmlens.ui.callbacks import Dashboard, new_session
    from vlmlens.ui.panels import generation_markdown

    lm = tiny
    dash = Dashboard(model="tiny-shapes", runs_dir=tmp_path, loader=lambda *a, **k: lm)
    dash.holder.wait(60)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    sess, *_ = dash.capture(photo, "How many objects are there?", 2, new_session())
    entry = dash.entry(sess)
    assert "border" in entry.run.meta["out_of_world"] and "unlike the shapes world" in generation_markdown(entry)
    example = Path(__file__).resolve().parents[1] / "assets" / "examples" / "shapes_00.png"
    sess, *_ = dash.capture(str(example), "How many objects are there?", 2, sess)
    assert "out_of_world" not in dash.entry(sess).run.meta
