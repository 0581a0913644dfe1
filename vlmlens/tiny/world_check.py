"""Does an image look like the tiny shapes world? A cheap check, so the dashboard can say so
when tiny-shapes is shown a photo (it then answers "four four four…" and every headline
describes a model reading pictures it has never seen).

A shapes-world scene (:func:`vlmlens.tiny.scenes.make_scene`) sits on a light, nearly grey,
lightly noisy background that fills the image's border: each channel 188..246, channels within
16 of each other, pixel noise of std 6. The check looks only at the border (2 px of the image
at the model's 64 x 64): its median colour must be such a grey, and most border pixels close to
it. Photos, drawings on white, dark or colourful images fail; a blank shapes background passes.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 64
BORDER = 2


def shapes_world_check(image: Image.Image) -> str | None:
    """None when ``image`` looks like a shapes-world scene, else the reason in words."""
    a = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR), dtype=np.float64)
    frame = np.concatenate([a[:BORDER].reshape(-1, 3), a[-BORDER:].reshape(-1, 3),
                            a[BORDER:-BORDER, :BORDER].reshape(-1, 3), a[BORDER:-BORDER, -BORDER:].reshape(-1, 3)])
    m = np.median(frame, axis=0)
    close = float(np.mean(np.abs(frame - m).max(axis=1) <= 30))
    if not (180 <= m.min() and m.max() <= 250):
        return f"its border is not the light grey of the shapes world (median colour {tuple(int(v) for v in m)})"
    if m.max() - m.min() > 24:
        return f"its border is coloured, not grey (median colour {tuple(int(v) for v in m)})"
    if close < 0.7:
        return f"its border is not a plain background ({close:.0%} of border pixels near its median colour)"
    return None
