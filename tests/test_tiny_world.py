"""Shapes world: scene determinism, task answers vs ground truth, tokenizer/processor."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vlmlens.tiny.scenes import COLORS, IMAGE_SIZE, SHAPES, blank_image, make_scene
from vlmlens.tiny.tasks import (FAMILIES, NUMBERS, SPLITS, caption, final_answer, make_example,
                                split_seeds, split_examples)
from vlmlens.tiny.tokenizer import NUM_IMAGE_TOKENS, FastEncoder, build_processor, chat_prompt, pixels


@pytest.fixture(scope="module")
def processor():
    return build_processor()


# ------------------------------------------------------------------ scenes
def test_same_seed_same_pixels_and_truth():
    a, b = make_scene(1234), make_scene(1234)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.truth() == b.truth()
    assert a.image.size == (IMAGE_SIZE, IMAGE_SIZE) and a.image.mode == "RGB"


def test_different_seeds_differ():
    imgs = [np.asarray(make_scene(s).image) for s in range(20)]
    truths = [make_scene(s).truth()["objects"] for s in range(20)]
    for i in range(19):
        assert not np.array_equal(imgs[i], imgs[i + 1])
    assert len({str(t) for t in truths}) == 20


def test_scene_statistics_cover_the_world():
    objs = [o for s in range(400) for o in make_scene(s).objects]
    counts = Counter(len(make_scene(s).objects) for s in range(400))
    assert set(counts) == {1, 2, 3, 4}
    assert {o.shape for o in objs} == set(SHAPES) and {o.color for o in objs} == set(COLORS)
    assert {(o.row, o.col) for o in objs} == {(r, c) for r in range(3) for c in range(3)}


def test_objects_are_in_their_cells_and_canonically_ordered():
    for s in range(200):
        sc = make_scene(s)
        cells = [(o.row, o.col) for o in sc.objects]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)
        assert len({o.name for o in sc.objects}) == len(sc.objects)  # color+shape unique
        for o in sc.objects:
            assert int(o.x // (IMAGE_SIZE / 3)) == o.col and int(o.y // (IMAGE_SIZE / 3)) == o.row


def test_objects_are_actually_drawn():
    """The object's centre pixel is near its colour; a blank scene has no such pixels."""
    from vlmlens.tiny.scenes import RGB

    for s in range(50):
        sc = make_scene(s)
        arr = np.asarray(sc.image).astype(int)
        for o in sc.objects:
            px = arr[int(round(o.y)), int(round(o.x))]
            assert np.abs(px - np.array(RGB[o.color])).max() < 45, (s, o, px)
    assert np.asarray(blank_image()).std() == 0


# ------------------------------------------------------------------ tasks
def test_examples_are_deterministic():
    for fam in FAMILIES:
        a, b = make_example(77, fam), make_example(77, fam)
        assert (a.prompt, a.answer, a.kind) == (b.prompt, b.answer, b.kind)


def test_answers_match_ground_truth():
    for s in range(300):
        sc = make_scene(s)
        for kind in ("count", "count_shape", "color", "shape", "exist", "side", "size"):
            try:
                e = make_example(s, "single", kind=kind)
            except ValueError:
                continue
            assert len(e.answer.split()) == 1
            if kind == "count":
                assert e.answer == NUMBERS[len(sc.objects)]
            elif kind == "count_shape":
                shape = re.search(r"many (\w+)s are", e.prompt).group(1)
                assert e.answer == NUMBERS[len(sc.find(shape=shape))]
            elif kind == "color":
                shape = re.search(r"is the (\w+)\?", e.prompt).group(1)
                assert [o.color for o in sc.find(shape=shape)] == [e.answer]
            elif kind == "shape":
                color = re.search(r"the (\w+) object", e.prompt).group(1)
                assert [o.shape for o in sc.find(color=color)] == [e.answer]
            elif kind == "exist":
                color, shape = re.search(r"there a (\w+) (\w+)\?", e.prompt).groups()
                assert e.answer == ("yes" if sc.find(shape=shape, color=color) else "no")
            elif kind == "side":
                c1, s1, c2, s2 = re.search(r"the (\w+) (\w+) on the .* of the (\w+) (\w+)\?", e.prompt).groups()
                a, b = sc.find(s1, c1)[0], sc.find(s2, c2)[0]
                assert e.answer == ("left" if a.col < b.col else "right")


def test_caption_lists_every_object_in_row_major_order():
    sc = make_scene(5)
    cap = caption(sc)
    assert cap.count(" and ") == len(sc.objects) - 1
    parts = cap.split(" and ")
    for part, o in zip(parts, sc.objects):
        assert part == f"a {o.size} {o.color} {o.shape} at {o.position}"
    assert make_example(5, "caption").answer == cap


def test_reasoning_traces_end_in_a_correct_answer():
    for s in range(300):
        sc = make_scene(s)
        e = make_example(s, "reasoning")
        assert e.answer.rsplit(". ", 1)[1].startswith("answer: ")
        if e.kind == "left_of":
            c1, s1, c2, s2 = re.match(r"Is the (\w+) (\w+) left of the (\w+) (\w+)\?", e.prompt).groups()
            want = sc.find(s1, c1)[0].col < sc.find(s2, c2)[0].col
            assert e.final_answer == ("yes" if want else "no")
        elif e.kind == "count_color":
            color = re.match(r"How many (\w+) objects", e.prompt).group(1)
            assert e.final_answer == NUMBERS[len(sc.find(color=color))]
        elif e.kind == "more":
            a, b = re.match(r"Are there more (\w+)s than (\w+)s\?", e.prompt).groups()
            assert e.final_answer == ("yes" if len(sc.find(a)) > len(sc.find(b)) else "no")


def test_yes_no_answers_are_balanced():
    c = Counter(make_example(s, "single", kind="exist").answer for s in range(400))
    assert 0.4 < c["yes"] / 400 < 0.6
    r = Counter(make_example(s, "reasoning").final_answer for s in range(600))
    assert 0.3 < r["yes"] / (r["yes"] + r["no"]) < 0.7


def test_final_answer_parser():
    assert final_answer("the circle is red. so they are different. answer: no") == "no"
    assert final_answer("answer : yes") == "yes"
    assert final_answer("blue") == "blue"


def test_splits_are_disjoint_and_test_split_is_fixed():
    ranges = sorted(SPLITS.values())
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 <= b0
    assert split_seeds("test", 3) == [0, 1, 2]
    assert [e.prompt for e in split_examples("single", 5)] == [make_example(s, "single").prompt for s in range(5)]


# ------------------------------------------------------------------ tokenizer / processor
def test_vocabulary_covers_every_template(processor):
    tok = processor.tokenizer
    unk = tok.convert_tokens_to_ids("<unk>")
    for fam in FAMILIES:
        for s in range(0, 1600, 4):
            e = make_example(s, fam)
            ids = tok(e.prompt + " " + e.answer, add_special_tokens=False)["input_ids"]
            assert unk not in ids, (e.prompt, e.answer)


def test_round_trip_and_punctuation(processor):
    tok = processor.tokenizer
    for s in range(50):
        for fam in FAMILIES:
            ans = make_example(s, fam).answer
            assert tok.decode(tok(ans, add_special_tokens=False)["input_ids"]) == ans
    assert tok.tokenize("What color is the circle?") == ["what", "color", "is", "the", "circle", "?"]
    assert tok.tokenize("answer: yes.") == ["answer", ":", "yes", "."]


def test_unknown_words_map_to_unk(processor):
    tok = processor.tokenizer
    ids = tok("what is a zebra doing", add_special_tokens=False)["input_ids"]
    unk = tok.convert_tokens_to_ids("<unk>")
    assert ids[3] == unk and ids[4] == unk and ids[0] != unk
    assert ids.count(unk) == 2


def test_chat_template_and_image_expansion(processor):
    text = processor.apply_chat_template(chat_prompt("What color is the circle?"), add_generation_prompt=True)
    assert text == "<s>USER: <image> What color is the circle? ASSISTANT:"
    inp = processor(images=[make_scene(3).image], text=text, return_tensors="pt")
    ids = inp["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert NUM_IMAGE_TOKENS == 64 and ids.count(image_id) == 64
    assert ids[0] == processor.tokenizer.convert_tokens_to_ids("<s>")
    assert tuple(inp["pixel_values"].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # the training fast path produces exactly what the processor produces
    enc = FastEncoder(processor.tokenizer)
    assert enc.head + enc.turn_ids("What color is the circle?", first=True) == ids
    px = pixels(make_scene(3).image)
    assert np.abs(inp["pixel_values"][0].numpy() - px).max() < 1e-5


def test_training_conversation_matches_chat_template(processor):
    """A packed training sequence (several questions about one scene) is token for token what
    the chat template renders for that conversation, and only answer tokens are targets."""
    from vlmlens.tiny.train import Batcher, TrainConfig

    cfg = TrainConfig(turns=3, family_weights=(1.0, 1.0, 1.0))
    b = Batcher(FastEncoder(processor.tokenizer), cfg)
    episodes = b.episodes(6)
    assert [len(t) for t in episodes].count(3) >= 4  # most fit 3 turns in max_len
    batch = b.collate(episodes)
    tok = processor.tokenizer
    for row, turns in enumerate(episodes):
        assert len({t.prompt for t in turns}) == len(turns) and len({t.seed for t in turns}) == 1
        msgs = []
        for i, ex in enumerate(turns):
            user = [{"type": "image"}] if i == 0 else []
            msgs += [{"role": "user", "content": user + [{"type": "text", "text": ex.prompt}]},
                     {"role": "assistant", "content": [{"type": "text", "text": ex.answer}]}]
        text = processor.apply_chat_template(msgs)
        ids = processor(images=[turns[0].scene.image], text=text, return_tensors="pt")["input_ids"][0].tolist()
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == ids
        tgt = batch["target"][row]
        answers = [t for t in tgt.tolist() if t != -100]
        expected = []
        for ex in turns:
            expected += tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert answers == expected
        # target at t is the token at t+1
        pos = (tgt != -100).nonzero().flatten()
        assert (batch["input_ids"][row, pos + 1] == tgt[pos]).all()


def test_processor_accepts_arbitrary_images(processor):
    from PIL import Image

    text = processor.apply_chat_template(chat_prompt("What shape is it?"), add_generation_prompt=True)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (37, 512), dtype=np.uint8)).convert("RGB"),
            Image.fromarray(rng.integers(0, 255, (90, 90), dtype=np.uint8), "L"),
            Image.new("RGBA", (640, 480), (10, 200, 30, 128))]
    for im in imgs:
        pv = processor(images=[im], text=text, return_tensors="pt")["pixel_values"]
        assert tuple(pv.shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert float(pv.abs().max()) <= 1.0 + 1e-5


def test_training_runs_end_to_end_and_saves_a_loadable_llava(tmp_path):
    """A few steps of the real recipe (tiny sizes): the loss goes down on a fixed batch-sized
    stream, the output folder loads with plain transformers, and the config is recorded."""
    import json

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmlens.tiny.model import TinyArch, build_model
    from vlmlens.tiny.train import Batcher, TrainConfig, batch_loss, train

    arch = TinyArch(vision_dim=32, vision_layers=1, vision_heads=2, vision_mlp=64,
                    text_dim=32, text_layers=2, text_heads=2, text_mlp=64)
    cfg = TrainConfig(steps=60, batch_size=4, warmup=5, vision_warmup_steps=3, eval_every=60,
                      save_every=60, turns=2, arch=arch, lr=5e-3)
    res = train(str(tmp_path / "m"), cfg, log=lambda *_: None)
    hist = res["history"]
    assert [h["step"] for h in hist] == [60]
    meta = json.loads((tmp_path / "m" / "training.json").read_text())
    assert meta["steps_done"] == 60 and meta["config"]["turns"] == 2
    assert meta["train_seeds"] == [SPLITS["train"][0], SPLITS["train"][0] + 4 * (60 + 3)]
    model = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "m")).eval()
    proc = AutoProcessor.from_pretrained(str(tmp_path / "m"))
    # on held-out validation conversations the saved model beats its own initialisation
    # (60 steps learn the answer templates: "answer:", "the", "</s>", ...)
    val = Batcher(FastEncoder(proc.tokenizer), cfg, split="val")
    batch = val.collate(val.episodes(16))
    fresh = build_model(arch, proc.tokenizer, seed=cfg.seed).eval()
    with torch.no_grad():
        trained_loss, before = float(batch_loss(model, batch)[0]), float(batch_loss(fresh, batch)[0])
    print(f"val loss {before:.3f} -> {trained_loss:.3f}")
    assert before > 3.5 and trained_loss < 0.8 * before, (trained_loss, before)
    assert model.config.text_config.num_hidden_layers == 2
    x = proc(images=[make_scene(0).image], text=proc.apply_chat_template(chat_prompt("Describe the image."),
             add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**x).logits).all()
