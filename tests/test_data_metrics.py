"""Datasets in the forms users have, and the task metrics, on cases with known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmlens.data import load_dataset
from vlmlens.errors import InputError
from vlmlens.metrics import (caption_scores, exact_match, final_answer, mc_accuracy, mc_letter, normalize_vqa,
                             simple_tokenize, vqa_accuracy)


def _folder(tmp_path, n=3):
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def test_manifests_in_every_form_read_the_same(tmp_path):
    d = _folder(tmp_path)
    rows = [{"id": "a", "image": "img/0.png", "question": "What color?", "answers": ["red", "dark red"]},
            {"id": "b", "image": "img/1.png", "prompt": "Which one?", "answer": "B", "choices": ["x", "y"], "task": "mc"},
            {"id": "c", "file_name": "img/2.png", "question": "Count?", "answer": "2"}]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import csv

    with open(d / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "question", "answer", "choices", "task"])
        w.writeheader()
        w.writerow({"id": "a", "image": "img/0.png", "question": "What color?", "answer": "red|dark red"})
        w.writerow({"id": "b", "image": "img/1.png", "question": "Which one?", "answer": "B", "choices": '["x", "y"]',
                    "task": "mc"})
        w.writerow({"id": "c", "image": "img/2.png", "question": "Count?", "answer": "2"})
    import pandas as pd

    pd.DataFrame([{"id": r["id"], "image": r.get("image", r.get("file_name")), "question": r.get("question", r.get("prompt")),
                   "answers": r.get("answers", [r.get("answer")]), "choices": r.get("choices", []), "task": r.get("task")}
                  for r in rows]).to_parquet(d / "m.parquet")
    (d / "metadata.jsonl").write_text((d / "m.jsonl").read_text())
    import datasets

    hf = datasets.Dataset.from_dict({"image": [Image.open(d / "img" / f"{i}.png") for i in range(3)],
                                     "question": ["What color?", "Which one?", "Count?"],
                                     "answers": [["red", "dark red"], ["B"], ["2"]], "id": ["a", "b", "c"]},
                                    features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                                                "answers": datasets.Sequence(datasets.Value("string")),
                                                                "id": datasets.Value("string")}))
    hf.save_to_disk(str(d / "hf"))
    got = {}
    for name in ("m.jsonl", "m.csv", "m.parquet", ".", "hf"):
        ds = load_dataset(d / name, task="vqa")
        got[name] = ds
        assert [it.id for it in ds.items] == ["a", "b", "c"] and not ds.skipped, name
        assert ds.items[0].answers == ("red", "dark red") and ds.items[0].task == "vqa", name
        assert ds.items[0].prompt == "What color?", name
    for name in ("m.jsonl", "m.csv", "m.parquet"):
        assert got[name].items[1].choices == ("x", "y") and got[name].items[1].task == "mc"
        assert got[name].items[2].image == str((d / "img" / "2.png").resolve())
    assert got["hf"].format == "datasets" and got["hf"].items[0].image.size == (16, 16)
    assert got["."].format == "jsonl" and len(got["m.jsonl"].fingerprint) == 64


def test_bad_rows_are_reported_with_their_row_numbers(tmp_path):
    d = _folder(tmp_path, 1)
    (d / "img" / "broken.png").write_bytes(b"not a png")
    (tmp_path.parent / "outside.png").write_bytes((d / "img" / "0.png").read_bytes())
    lines = [
        json.dumps({"image": "img/0.png", "question": "ok?", "answer": "yes"}),
        json.dumps({"image": "img/missing.png", "question": "q", "answer": "a"}),
        json.dumps({"image": "img/broken.png", "question": "q", "answer": "a"}),
        json.dumps({"image": "../outside.png", "question": "q", "answer": "a"}),
        json.dumps({"image": "img/0.png", "question": "   ", "answer": "a"}),
        json.dumps({"image": "img/0.png", "question": 7, "answer": "a"}),
        json.dumps({"image": "img/0.png", "question": "q", "answer": {"x": 1}}),
        "{not json",
        json.dumps({"question": "no image"}),
    ]
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_dataset(d / "m.jsonl")
    assert len(ds) == 1
    reasons = {b["row"]: b["reason"] for b in ds.skipped}
    assert set(reasons) == set(range(2, 10))
    assert reasons[2].startswith("missing image") and reasons[3].startswith("unreadable image")
    assert reasons[4].startswith("image path leaves the dataset folder") and reasons[5] == "empty prompt"
    assert "wrong type for prompt" in reasons[6] and "wrong type for answer" in reasons[7]
    assert reasons[8].startswith("not JSON") and reasons[9].startswith("no image column")
    assert "skipped 8" in ds.summary()
    with pytest.raises(InputError, match=r"row 2: missing image"):
        load_dataset(d / "m.jsonl", on_bad_row="fail")
    with pytest.raises(InputError, match="on-bad-row must be one of"):
        load_dataset(d / "m.jsonl", on_bad_row="ignore")
    with pytest.raises(InputError, match="unknown dataset format"):
        (d / "m.txt").write_text("x")
        load_dataset(d / "m.txt")
    with pytest.raises(InputError, match="not found"):
        load_dataset(d / "nope.jsonl")
    (d / "empty.jsonl").write_text(lines[1] + "\n")
    with pytest.raises(InputError, match="no usable rows; e.g. row 1: missing image"):
        load_dataset(d / "empty.jsonl")


def test_vqa_normalisation_and_soft_accuracy():
    assert normalize_vqa("Two.") == "2" and normalize_vqa("the Dog!") == "dog" and normalize_vqa("1,000") == "1000"
    assert normalize_vqa("dont know") == "don't know" and normalize_vqa("2.5") == "2.5"
    assert normalize_vqa("a red-ish  car") == "red ish car"      # the official rule: a mark touching no space -> space
    ten = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", ten) == pytest.approx(0.9)        # (3 x 2/3 + 7 x 1) / 10
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    one = ["2"] + ["5"] * 9
    assert vqa_accuracy("2", one) == pytest.approx(0.3)          # 9 subsets score 1/3, the 10th 0
    assert vqa_accuracy("7", ten) == 0.0
    assert vqa_accuracy("Yes", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0
    assert exact_match("The cat.", ["dog", "cat"]) == 1.0 and exact_match("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_multiple_choice_letters():
    ch = ["red", "green", "blue", "black"]
    for text, want in [("B", "B"), ("(C)", "C"), ("D.", "D"), ("The answer is A.", "A"), ("answer: c", "C"),
                       ("B) green", "B"), ("blue", "C"), ("I think so", None), ("E", None)]:
        assert mc_letter(text, ch) == want, text
    assert mc_accuracy("The answer is C", ["C"], ch) == 1.0
    assert mc_accuracy("C", ["blue"], ch) == 1.0 and mc_accuracy("A", ["blue"], ch) == 0.0
    assert final_answer("the circle is red. answer: Yes", "answer:").strip() == "Yes"


def test_caption_scores_known_cases():
    refs = {"1": ["a red circle at top left", "a red circle in the top left corner"],
            "2": ["two green squares", "a pair of green squares"],
            "3": ["a blue triangle at the bottom", "one blue triangle at the bottom"]}
    same = {k: v[0] for k, v in refs.items()}
    wrong = {"1": "a dog on a sofa", "2": "a dog on a sofa", "3": "a dog on a sofa"}
    good = caption_scores(same, refs, tokenizer="simple")
    bad = caption_scores(wrong, refs, tokenizer="simple")
    assert good["cider_d"] > 1.0 > bad["cider_d"] >= 0 and good["bleu_4"] > 0.9 > bad["bleu_4"]
    assert np.mean(list(good["per_item"].values())) == pytest.approx(good["cider_d"])
    assert good["tokenizer"].startswith("simple")
    assert simple_tokenize("A red, Circle.") == "a red circle"
    auto = caption_scores(same, refs)            # PTB (Java): the install puts a Java runtime on the machine
    assert auto["tokenizer"].startswith("PTB (Java") and auto["cider_d"] > 1.0
