"""Write the shipped real-photo example dataset: four photos bundled with scikit-image, with
hand-written questions (VQA with several answers, multiple choice, captions).

    pip install scikit-image      # only to run this script; the written files are in the repo
    python scripts/make_photo_dataset.py --out assets/datasets/photos

The photos (``skimage.data``): astronaut (Eileen Collins, NASA, public domain), chelsea (a cat,
CC0), coffee (Rachel Michetti, CC0), rocket (SpaceX, public domain). They are scaled to 336 px on
the long side and saved as JPEG.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [
    # image, task, question, answers, choices
    ("astronaut", "vqa", "What color is the person's suit?", ["orange"] * 8 + ["red", "orange and white"], None),
    ("astronaut", "mc", "What is on the left edge of the picture?", ["A"], ["a flag", "a tree", "a window", "a horse"]),
    ("astronaut", "caption", "Describe the image.",
     ["an astronaut in an orange spacesuit smiling next to an american flag",
      "a woman in an orange space suit with a helmet and a model of the space shuttle behind her"], None),
    ("chelsea", "vqa", "What animal is this?", ["cat"] * 7 + ["kitten", "tabby cat", "tabby"], None),
    ("chelsea", "vqa", "What color are the animal's eyes?", ["green"] * 6 + ["yellow", "yellow green", "green", "olive"],
     None),
    ("chelsea", "mc", "How many animals are in the picture?", ["A"], ["one", "two", "three", "none"]),
    ("coffee", "vqa", "What drink is in the cup?", ["coffee"] * 6 + ["espresso"] * 4, None),
    ("coffee", "vqa", "What color is the saucer?", ["red"] * 7 + ["dark red", "brown", "maroon"], None),
    ("coffee", "caption", "Describe the image.",
     ["a cup of espresso on a red saucer with a spoon on a wooden table",
      "a small white and red coffee cup with a spoon on a wooden table"], None),
    ("rocket", "vqa", "Is it day or night?", ["night"] * 8 + ["dusk", "evening"], None),
    ("rocket", "mc", "What stands in the middle of the picture?", ["A"], ["a rocket", "a tree", "a bus", "a lighthouse"]),
    ("rocket", "caption", "Describe the image.",
     ["a rocket on a launch pad at night between tall towers with bright lights",
      "a white rocket standing on the launch pad under a dark blue sky"], None),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/datasets/photos")
    a = ap.parse_args()
    from PIL import Image
    from skimage import data

    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted({r[0] for r in ROWS}):
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        im.thumbnail((336, 336), Image.Resampling.LANCZOS)
        im.save(out / "images" / f"{name}.jpg", quality=90)
    with open(out / "manifest.jsonl", "w") as f:
        for i, (name, task, q, answers, choices) in enumerate(ROWS):
            row = {"id": f"{name}-{i}", "image": f"images/{name}.jpg", "question": q, "answers": answers, "task": task}
            if choices:
                row["choices"] = choices
                row["question"] = q + " " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", choices)) + \
                    " Answer with the letter."
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(ROWS)} rows to {out}/manifest.jsonl")


if __name__ == "__main__":
    main()
