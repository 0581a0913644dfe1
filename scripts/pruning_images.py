"""Draw which image tokens each pruning method keeps on one shapes example, per layer, as one
PNG (rows: methods, columns: layers; kept tokens bright, pruned ones dimmed).

    python scripts/pruning_images.py --out docs/pruning/kept_tokens.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import vlmlens as vl  # noqa: E402
from vlmlens.interventions import AdaptiveVTW, FastV, PyramidDrop, StagePruner  # noqa: E402

TILE = 160


def kept_tile(run, layer: int) -> Image.Image:
    """The run's image with the tokens layer ``layer`` no longer reads dimmed."""
    img = run.image.convert("RGB").resize((TILE, TILE), Image.Resampling.BICUBIC)
    grid = run.to_grid(np.asarray(run.arrays["image_kept"][layer], np.float64))
    mask = np.nan_to_num(grid, nan=0.0)
    up = np.asarray(Image.fromarray((mask * 255).astype(np.uint8), "L").resize((TILE, TILE), Image.Resampling.NEAREST))
    a = np.asarray(img, np.float32)
    w = (up[..., None] / 255.0)
    out = a * (0.25 + 0.75 * w)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), "RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default="assets/examples/shapes_03.png")
    ap.add_argument("--prompt", default="How many objects are there?")
    ap.add_argument("--layers", default="0,2,4,6,7")
    ap.add_argument("--out", default="docs/pruning/kept_tokens.png")
    a = ap.parse_args()
    lm = vl.load_model("tiny-shapes")
    L = lm.n_layers
    methods = {
        "FastV K=2 keep 25%": [FastV(2, 0.25)],
        "random K=2 keep 25%": [FastV(2, 0.25, score="random")],
        "L2 K=2 keep 25%": [FastV(2, 0.25, score="l2")],
        "PyramidDrop 2/4/6": [PyramidDrop([2, 4, 6], [0.5, 0.25, 0.125])],
        "StagePruner none/top 10%": [StagePruner([(0, 5, "none"), (6, L - 1, "top")], 0.1)],
        "adaptive VTW share<0.4": [AdaptiveVTW(0.4, min_layer=1)],
    }
    layers = [int(x) for x in a.layers.split(",")]
    label_w, head_h = 190, 24
    sheet = Image.new("RGB", (label_w + TILE * len(layers), head_h + TILE * len(methods)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, l in enumerate(layers):
        draw.text((label_w + j * TILE + 6, 6), f"layer {l}", fill="black")
    for i, (name, ivs) in enumerate(methods.items()):
        run = vl.capture(lm, a.image, a.prompt, max_new_tokens=4, interventions=ivs)
        draw.text((6, head_h + i * TILE + 6), name, fill="black")
        draw.text((6, head_h + i * TILE + 24), f"-> {run.generated_text!r}", fill="#444444")
        for j, l in enumerate(layers):
            kept = int(run.arrays["image_kept"][l].sum())
            sheet.paste(kept_tile(run, l), (label_w + j * TILE, head_h + i * TILE))
            draw.text((label_w + j * TILE + 4, head_h + i * TILE + TILE - 14), f"{kept}/{run.spans.n_image}",
                      fill="white")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
