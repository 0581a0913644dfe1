"""The maps of one input, scored: which map, where the asked object is, and one report for them all.

:func:`check_maps` captures the input once, reads each map (:func:`map_values`: attention, LLaVA-CAM,
the patch lens) and scores it with one :class:`vlmlens.experiments.map_check.MapScorer` (the random
orders shared); on a shapes-world scene it adds the pointing game on the object the prompt names
(:func:`asked_object`, :func:`object_tokens`, :func:`pointing_game`). The curves and their verdicts
are :mod:`vlmlens.experiments.map_check`'s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError
from ..metrics import DEFAULT_SEPARATOR
from ..vocabulary import MAP_KINDS
from .map_check import DEFAULT_RANDOM, DEFAULT_STEPS, MAX_FORWARDS, MapScorer


# ---- the maps of a run ------------------------------------------------------------------------------

def map_values(lm, run, kind: str, layer: int, *, query_index: int = 0, cam=None) -> np.ndarray:
    """One map of ``run`` over its image tokens, in token order: ``attention`` (head-averaged
    attention of the recorded query to each image token), ``LLaVA-CAM`` (stored, given as ``cam``
    [layer, n_image] by a caller that caches it, or computed with ``lm``), ``patch lens`` (the
    probability of the run's first generated token when each image token's state at ``layer`` is
    read through the unembedding)."""
    if kind not in MAP_KINDS:
        raise InputError(f"map must be one of {', '.join(MAP_KINDS)}, got {kind!r}")
    L = run.n_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < L + (kind == "patch lens"):
        raise InputError(f"layer must be an integer in 0..{L - 1 + (kind == 'patch lens')}, got {layer!r}")
    layer = int(layer)
    if kind == "attention":
        if "attention_maps" not in run.arrays:
            raise InputError("this run recorded no attention to the image (capture with record_attention=True)")
        maps = np.asarray(run.attention_maps)
        if not 0 <= query_index < maps.shape[1]:
            raise InputError(f"query must be 0..{maps.shape[1] - 1}, got {query_index!r}")
        return maps[layer, query_index].astype(np.float64)
    if kind == "LLaVA-CAM":
        if cam is not None:
            return np.asarray(cam[layer], dtype=np.float64)
        if "llava_cam" in run.arrays:
            return np.asarray(run.arrays["llava_cam"][layer], dtype=np.float64)
        from ..analysis.cam import llava_cam

        cam = llava_cam(lm, run)
        return np.asarray(cam.per_token[list(cam.layers).index(layer)], dtype=np.float64)
    import torch

    from ..analysis.logit_lens import layer_logits

    gen = run.token_ids[run.spans.n_prompt:]
    if not gen:
        raise InputError("the run generated nothing: the patch lens has no token to read")
    try:
        logits = layer_logits(lm, run, layer, run.spans.positions("image"))
    except ValueError as e:
        raise InputError(f"the patch lens needs the image tokens' hidden states: {e}") from None
    return torch.softmax(logits.float(), -1)[:, int(gen[0])].double().numpy()


# ---- where the asked object is known (the shapes world) ---------------------------------------------

def object_tokens(run, obj, image_size: int | None = None) -> list[int]:
    """The image tokens whose grid cell overlaps the object's extent (a shapes-world
    :class:`vlmlens.tiny.scenes.SceneObject`, in the scene's native pixels) on ``run``'s grid."""
    from ..tiny.scenes import _RADIUS, IMAGE_SIZE

    size = float(image_size or IMAGE_SIZE)
    rows, cols = run.image_grid
    gi = run.grid_index
    r = _RADIUS[obj.size] * 1.12            # the widest shape (the triangle) reaches 1.12 radii
    out = []
    for i in range(rows):
        for j in range(cols):
            y0, y1 = i * size / rows, (i + 1) * size / rows
            x0, x1 = j * size / cols, (j + 1) * size / cols
            if x0 < obj.x + r and obj.x - r < x1 and y0 < obj.y + r and obj.y - r < y1 and gi[i, j] >= 0:
                out.append(int(gi[i, j]))
    return sorted(out)


def pointing_game(values, tokens) -> dict:
    """Does the map's peak fall on the object (``tokens``)? And the share of the map's (positive)
    mass inside it, next to the share of the image the object covers (what a flat map gets)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    t = sorted({int(i) for i in tokens})
    if not t:
        raise InputError("no image tokens for the object: nothing to point at")
    pos = np.clip(v, 0, None)
    total = float(pos.sum())
    return {"hit": bool(int(np.argmax(v)) in t), "energy": float(pos[t].sum() / total) if total > 0 else 0.0,
            "area": len(t) / v.size, "peak": int(np.argmax(v)), "object_tokens": t}


def asked_object(scene, prompt: str):
    """The one object of a shapes-world scene that ``prompt`` names (by shape and/or colour), else None."""
    from ..tiny.scenes import COLORS, SHAPES

    words = set(prompt.lower().replace("?", " ").replace(",", " ").replace(".", " ").split())
    shapes = [s for s in SHAPES if s in words or s + "s" in words]
    colors = [c for c in COLORS if c in words]
    if len(shapes) > 1 or len(colors) > 1 or not (shapes or colors):
        return None
    found = scene.find(shapes[0] if shapes else None, colors[0] if colors else None)
    return found[0] if len(found) == 1 else None


# ---- every map of one input -----------------------------------------------------------------------

@dataclass
class MapReport:
    """Every map checked on one input: the checks, the pointing game where the object is known."""

    model: str
    prompt: str
    answer: str
    checks: list                       # MapCheck per map
    pointing: dict                     # map name -> pointing_game(...) (only with a known object)
    forwards: int
    seconds: float
    obj: str | None = None             # the asked object ("a large red circle at top left"), when known

    def to_json(self) -> dict:
        return asdict(self)

    def table(self):
        from ..tables import Table, fixed, percent

        rows = []
        for c in self.checks:
            d, i = c.auc["deletion"], c.auc["insertion"]
            g = self.pointing.get(c.name) or {}
            rows.append({"map": c.name, "del": d["map"], "del_random": d["random"], "del_p": d["p"],
                         "del_verdict": c.verdict["deletion"], "ins": i["map"], "ins_random": i["random"],
                         "ins_p": i["p"], "ins_verdict": c.verdict["insertion"],
                         "hit": None if not g else ("yes" if g["hit"] else "no"),
                         "energy": g.get("energy"), "area": g.get("area")})
        f2 = fixed(2)
        return Table(["map", "del", "del_random", "del_p", "del_verdict", "ins", "ins_random", "ins_p", "ins_verdict",
                      "hit", "energy", "area"], rows,
                     headers=["map", "deletion AUC", "random", "p", "deletion", "insertion AUC", "random", "p",
                              "insertion", "peak on the object", "mass on the object", "object's area"],
                     formats={"del": f2, "del_random": f2, "del_p": f2, "ins": f2, "ins_random": f2, "ins_p": f2,
                              "energy": percent, "area": percent})


def check_maps(lm, image, prompt: str, *, maps=(("attention", None), ("LLaVA-CAM", None), ("patch lens", None)),
               max_new_tokens: int = 16, separator: str = DEFAULT_SEPARATOR, target: str = "output",
               steps: int = DEFAULT_STEPS, n_random: int = DEFAULT_RANDOM, seed: int = 0,
               max_forwards: int = MAX_FORWARDS, scene=None, progress=None) -> MapReport:
    """Capture the input once, then score each map ``(kind, layer)`` (layer None: the middle decoder
    layer; the patch lens reads layer ``layer`` too) by its deletion and insertion curves; with a
    shapes-world ``scene`` also the pointing game on the object the prompt asks about."""
    import time

    from ..capture import capture

    t0 = time.perf_counter()
    for kind, _ in maps:
        if kind not in MAP_KINDS:
            raise InputError(f"map must be one of {', '.join(MAP_KINDS)}, got {kind!r}")
    scorer = MapScorer(lm, image, prompt, max_new_tokens=max_new_tokens, separator=separator, target=target,
                       steps=steps, n_random=n_random, seed=seed, max_forwards=max_forwards)
    run = capture(lm, image, prompt, max_new_tokens=max_new_tokens, store="image_text", record_attention=True)
    obj = asked_object(scene, prompt) if scene is not None else None
    toks = object_tokens(run, obj) if obj is not None else None
    checks, pointing = [], {}
    for j, (kind, layer) in enumerate(maps):
        layer = lm.n_layers // 2 if layer is None else int(layer)
        name = f"{kind}, layer {layer}"
        values = map_values(lm, run, kind, layer)
        checks.append(scorer.check(values, name))
        if toks:
            pointing[name] = pointing_game(values, toks)
        if progress:
            progress(j + 1, len(maps), name)
    return MapReport(lm.name, prompt, scorer.answer, checks, pointing, scorer.forwards,
                     round(time.perf_counter() - t0, 2), obj.describe() if obj is not None else None)
