"""Measure smol-shapes for its card: the shapes test split (per family), the blank-image control
(the same questions about a blank image: a model that reads the image must do much worse), and
photo naming on the training photos and on held-out photos (the answer names the encoder's own
ImageNet top-1 class). Everything goes through the ordinary path: ``load_model("smol-shapes")``
and the study engine.

``python -m vlmlens.real.evaluate --n 50`` prints the JSON and writes
``assets/smol-shapes/eval.json``.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from .build import ASSETS
from .train import PHOTO_PROMPT, classify, imagenet_names, photo_sources


def shapes_scores(lm, n: int, blank: bool = False) -> dict:
    """Per family: accuracy (single), exact match + token F1 (captions), final answer (reasoning)."""
    from ..capture import capture
    from ..experiments.study import _metrics, suite_examples
    from ..tiny.eval import MAX_NEW_TOKENS

    out = {}
    for fam in ("single", "caption", "reasoning"):
        exs = suite_examples("shapes", fam, n)
        preds = []
        for e in exs:
            img = Image.new("RGB", e.scene.image.size, (128, 128, 128)) if blank else e.scene.image
            run = capture(lm, img, e.prompt, max_new_tokens=MAX_NEW_TOKENS[fam] + 16, store="none",
                          record_attention=False)
            preds.append(run.generated_text)
        m = _metrics(fam, exs, preds)
        kinds = {}
        for k in sorted({e.kind for e in exs}):
            sub = [(e, p) for e, p in zip(exs, preds) if e.kind == k]
            kinds[k] = {"n": len(sub), "accuracy": _metrics(fam, [e for e, _ in sub], [p for _, p in sub])["accuracy"]}
        out[fam] = {**m, "n": n, "per_kind": kinds,
                    "examples": [{"prompt": e.prompt, "reference": e.answer, "output": p}
                                 for e, p in list(zip(exs, preds))[:5]]}
    return out


def photo_naming(lm, held_out: bool) -> dict:
    from ..capture import capture

    names = imagenet_names()
    photos = photo_sources(held_out=held_out)
    if not names or not photos:
        return {"n": 0, "note": "no photos or no ImageNet class names (install opencv-doc)"}
    rows = []
    for name, img in photos:
        label = names[int(classify(lm.model, lm.processor, [img])[0])]
        text = capture(lm, img, PHOTO_PROMPT, max_new_tokens=16, store="none", record_attention=False).generated_text
        rows.append({"photo": name, "classifier": label, "output": text, "named": label.lower() in text.lower()})
    return {"n": len(rows), "named": float(np.mean([r["named"] for r in rows])), "rows": rows}


def evaluate(n: int = 50) -> dict:
    import vlmlens as vl

    lm = vl.load_model("smol-shapes", device="cpu", dtype="float32")
    return {"model": lm.name, "shapes": shapes_scores(lm, n), "blank_image": shapes_scores(lm, n, blank=True),
            "photos_train": photo_naming(lm, False), "photos_held_out": photo_naming(lm, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmlens.real.evaluate")
    ap.add_argument("--n", type=int, default=50, help="shapes test examples per family")
    a = ap.parse_args(argv)
    res = evaluate(a.n)
    (ASSETS / "eval.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items()}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
