"""Attention sinks, tiny-shapes vs smol-shapes: per decoder layer, the share of the last prompt
token's attention (mean over heads) on the first token, on the image tokens, and elsewhere;
averaged over shapes-world test inputs and a real photo. Prints a markdown table (docs/study.md).

    python scripts/sink_table.py [--n 12]
"""
from __future__ import annotations

import argparse

import numpy as np

import vlmlens as vl
from vlmlens.experiments.study import suite_examples


def shares(lm, items):
    first, image = [], []
    for img, prompt in items:
        run = vl.capture(lm, img, prompt, max_new_tokens=1, store="none")
        first.append(np.nanmean(run.attention_first_token, axis=1))                 # [L]
        image.append(np.nanmean(run.attention_to_image[:, :, run.spans.n_prompt - 1], axis=1))
    return np.mean(first, 0), np.mean(image, 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12, help="shapes test inputs (single-word questions)")
    a = ap.parse_args()
    from skimage import data
    from PIL import Image

    items = [(e.scene.image, e.prompt) for e in suite_examples("shapes", "single", a.n)]
    photo = [(Image.fromarray(data.coffee()), "What is in this photo?")]
    for name in ("tiny-shapes", "smol-shapes"):
        lm = vl.load_model(name, device="cpu", dtype="float32")
        f, i = shares(lm, items)
        pf, pi = shares(lm, photo)
        print(f"\n{name} ({lm.n_layers} layers): last prompt token's attention, mean over heads")
        print("| layer | first token (shapes) | image (shapes) | first token (photo) | image (photo) |")
        print("|---|---|---|---|---|")
        for l in range(lm.n_layers):
            print(f"| {l} | {100 * f[l]:.0f}% | {100 * i[l]:.0f}% | {100 * pf[l]:.0f}% | {100 * pi[l]:.0f}% |")


if __name__ == "__main__":
    main()
