"""How a family's image tokens map onto the image, for drawing per-token values as heatmaps.

Every image token (an occurrence of the family's image-token id in ``input_ids``, counted in sequence
order, 0-based) belongs to exactly one ``GridSegment``: a rows x cols raster of tokens covering a box of
the original image. ``GridInfo`` lists the segments and names a *primary* drawable grid:

* ``raster`` (LLaVA, Qwen2-VL, Qwen2.5-VL, Gemma3, Mistral 3, single-tile InternVL/Idefics3): one segment; the
  tokens are the primary grid in row-major order and ``rows * cols == n_image_tokens``.
* ``base+anyres`` (LLaVA-NeXT): ``[base k x k | anyres grid, each row followed by one newline token]``.
  The primary grid is the base grid (k x k; the base image is the whole picture squashed to a square).
  The anyres segment is the higher-resolution grid over the unpadded picture; its ``row_stride`` is
  ``cols + 1`` because of the newline token (which has no image position).
* ``tiles`` (InternVL, Idefics3 with splitting): ``[tile(0,0) | tile(0,1) | ... | overview]``, each tile a
  k x k raster over its box; the overview (InternVL "thumbnail", Idefics3 "global") covers the whole
  image. The primary grid is the mosaic of the tiles (tile_rows*k x tile_cols*k), which covers the whole
  (resized) picture; ``rows * cols == n_image_tokens - k*k``.
* ``frames`` (a video, the Qwen-VL families): ``[slot 0 | slot 1 | ...]``, one raster per temporal slot; the
  primary grid is the slots laid out as the run's contact sheet (``frame_layout``).

``GridInfo.index_map()`` gives, for the primary grid, the image-token index of every cell, so
``values[info.index_map()]`` (or ``info.to_grid(values)``) is a heatmap; ``seg.index_map()`` does the
same for any segment in ``info.segments``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Box = tuple[float, float, float, float]  # (top, left, bottom, right) as fractions of the image
FULL: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class GridSegment:
    name: str  # "image" | "base" | "anyres" | "newline" | "tile" | "thumbnail" | "global"
    start: int  # index of its first token among the image tokens
    rows: int
    cols: int
    box: Box = FULL
    row_stride: int = 0  # tokens per row in the sequence (0 -> cols); > cols when rows end in extra tokens

    @property
    def stride(self) -> int:
        return self.row_stride or self.cols

    @property
    def n_tokens(self) -> int:
        return self.rows * self.stride

    def index_map(self) -> np.ndarray:
        """(rows, cols) array of image-token indices, row-major."""
        r = np.arange(self.rows)[:, None] * self.stride
        return self.start + r + np.arange(self.cols)[None, :]


class GridInfo(dict):
    """Layout of one image's tokens. A plain ``dict`` (JSON-serialisable, so it can be stored in run
    metadata and rebuilt with ``GridInfo(d)``) with keys:

    ``rows``, ``cols`` (primary drawable grid), ``order`` ("raster" | "base+anyres" | "tiles"),
    ``n_tokens``, ``exact`` (False when the layout had to be guessed), ``tile_grid`` ([tile_rows,
    tile_cols]), ``primary`` (indices into ``tiles`` that make up the primary grid) and ``tiles`` (one dict
    per ``GridSegment``: name, start, rows, cols, box, row_stride, n_tokens).
    """

    @classmethod
    def build(cls, rows, cols, order, segments, n, primary=(0,), tile_grid=(1, 1), exact=True) -> "GridInfo":
        return cls(
            rows=int(rows), cols=int(cols), order=order, n_tokens=int(n), exact=bool(exact),
            tile_grid=[int(x) for x in tile_grid], primary=[int(i) for i in primary],
            tiles=[
                {"name": s.name, "start": s.start, "rows": s.rows, "cols": s.cols, "box": list(s.box),
                 "row_stride": s.stride, "n_tokens": s.n_tokens}
                for s in segments
            ],
        )  # fmt: skip

    rows = property(lambda self: self["rows"])
    cols = property(lambda self: self["cols"])
    order = property(lambda self: self["order"])
    n_tokens = property(lambda self: self["n_tokens"])
    exact = property(lambda self: self["exact"])

    @property
    def segments(self) -> list[GridSegment]:
        return [
            GridSegment(t["name"], t["start"], t["rows"], t["cols"], tuple(t["box"]), t["row_stride"])
            for t in self["tiles"]
        ]

    def index_map(self) -> np.ndarray:
        """(rows, cols) image-token indices of the primary grid (-1 where no token lands)."""
        out = np.full((self.rows, self.cols), -1, dtype=np.int64)
        segs = self.segments
        for i in self["primary"]:
            s = segs[i]
            r0 = round(s.box[0] * self.rows)
            c0 = round(s.box[1] * self.cols)
            out[r0 : r0 + s.rows, c0 : c0 + s.cols] = s.index_map()
        return out

    def to_grid(self, values) -> np.ndarray:
        """Per-image-token values (length ``n_tokens``) -> (rows, cols) array on the primary grid."""
        v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values)
        if v.shape[0] != self.n_tokens:
            raise ValueError(f"expected {self.n_tokens} values (one per image token), got {v.shape[0]}")
        return v[self.index_map()]


def _check(info: GridInfo, n: int) -> GridInfo:
    total = sum(t["n_tokens"] for t in info["tiles"])
    if total != n:
        raise ValueError(f"image-token layout accounts for {total} tokens but the inputs have {n}: {dict(info)}")
    return info


def _isqrt_exact(n: int) -> int | None:
    k = math.isqrt(n)
    return k if k * k == n else None


def raster(rows: int, cols: int, n: int) -> GridInfo:
    return _check(GridInfo.build(rows, cols, "raster", [GridSegment("image", 0, rows, cols)], n), n)


def square_raster(n: int) -> GridInfo:
    k = _isqrt_exact(n)
    if k is None:
        raise ValueError(f"{n} image tokens do not form a square grid")
    return raster(k, k, n)


# ----------------------------------------------------------------------------------------------- Qwen


def qwen_grid(inputs: dict, n: int) -> GridInfo:
    """Rows/cols from ``image_grid_thw`` = (t, h, w) in patches; tokens are (h/m) x (w/m) after the m x m
    patch merge (m = 2 for released checkpoints; inferred here from the token count)."""
    thw = inputs["image_grid_thw"]
    if len(thw) != 1:
        raise ValueError(f"expected exactly one image, got image_grid_thw with {len(thw)} rows")
    t, h, w = (int(x) for x in thw[0])
    merge = _isqrt_exact(t * h * w // n) if n and (t * h * w) % n == 0 else None
    if merge is None or t != 1:
        raise ValueError(f"image_grid_thw {(t, h, w)} does not match {n} image tokens")
    return raster(h // merge, w // merge, n)


def pixtral_grid(inputs: dict, n: int) -> GridInfo:
    """Mistral 3 / Pixtral: ``image_sizes`` = (h, w) pixels of the resized picture, a whole number of tokens of
    s x s pixels each side (s = patch x merge, inferred here from the token count); the tokens are (h/s) x (w/s)
    in raster order. The [IMG_BREAK] ending each row and the [IMG_END] are text tokens, not counted."""
    sizes = inputs["image_sizes"]
    if len(sizes) != 1:
        raise ValueError(f"expected exactly one image, got image_sizes with {len(sizes)} rows")
    h, w = (int(x) for x in sizes[0])
    side = _isqrt_exact(h * w // n) if n and (h * w) % n == 0 else None
    if side is None or h % side or w % side:
        raise ValueError(f"image_sizes {(h, w)} does not match {n} image tokens")
    return raster(h // side, w // side, n)


def llava_grid(inputs: dict, n: int) -> GridInfo:
    """LLaVA: the square raster of a CLIP-style tower, or -- a Pixtral tower (Pixtral-12B), whose processor also
    gives ``image_sizes`` -- Pixtral's raster over the picture's own aspect ratio."""
    return pixtral_grid(inputs, n) if "image_sizes" in inputs else square_raster(n)


def frame_layout(n_slots: int) -> tuple[int, int]:
    """(rows, cols) of a video's contact sheet (vlmlens.video): the squarest grid of ``n_slots`` cells
    with no empty cell, rows <= cols (a prime count is one row)."""
    r = max(d for d in range(1, math.isqrt(n_slots) + 1) if n_slots % d == 0)
    return r, n_slots // r


def qwen_video_grid(inputs: dict, n: int) -> GridInfo:
    """A video's tokens from ``video_grid_thw`` = (t, h, w): t temporal slots (each ``temporal_patch_size``
    frames), each an (h/m) x (w/m) raster in sequence order. The primary grid is the contact sheet of the
    slots (``frame_layout``), one segment named "frame" per slot; ``tile_grid`` is the sheet's layout."""
    thw = inputs["video_grid_thw"]
    if len(thw) != 1:
        raise ValueError(f"expected exactly one video, got video_grid_thw with {len(thw)} rows")
    t, h, w = (int(x) for x in thw[0])
    per = n // t if n and n % t == 0 else 0
    merge = _isqrt_exact(h * w // per) if per and (h * w) % per == 0 else None
    if merge is None:
        raise ValueError(f"video_grid_thw {(t, h, w)} does not match {n} video tokens")
    k_r, k_c = h // merge, w // merge
    sr, sc = frame_layout(t)
    segs = [GridSegment("frame", i * per, k_r, k_c, box=(r / sr, c / sc, (r + 1) / sr, (c + 1) / sc))
            for i, (r, c) in enumerate(divmod(j, sc) for j in range(t))]
    return _check(GridInfo.build(sr * k_r, sc * k_c, "frames", segs, n, range(t), (sr, sc)), n)


# ------------------------------------------------------------------------------------------ LLaVA-NeXT


def _unpadded(orig_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
    """Shape of the anyres feature grid after the model removes the letterbox padding."""
    oh, ow = orig_hw
    gh, gw = grid_hw
    if ow / oh > gw / gh:  # wider than the canvas: padding was added top and bottom
        new_h = int(round(oh * (gw / ow), 7))
        return gh - 2 * ((gh - new_h) // 2), gw
    new_w = int(round(ow * (gh / oh), 7))
    return gh, gw - 2 * ((gw - new_w) // 2)


def _llava_next_info(k: int, hu: int, wu: int, n: int, exact: bool) -> GridInfo:
    base = GridSegment("base", 0, k, k)
    any_ = GridSegment("anyres", k * k, hu, wu, row_stride=wu + 1)
    return _check(GridInfo.build(k, k, "base+anyres", [base, any_], n, exact=exact), n)


def _shrunk(hu: int, wu: int, k: int, max_tiles: int | None) -> tuple[int, int]:
    """LLaVA-OneVision's "anyres_max_N": an unpadded grid of more than ~N base tiles of tokens is
    resized (bilinear) by ``ratio = sqrt(hu * wu / (N * k^2))`` when ``ratio > 1.1``."""
    if not max_tiles:
        return hu, wu
    ratio = math.sqrt(hu * wu / (max_tiles * k * k))
    return (int(hu // ratio), int(wu // ratio)) if ratio > 1.1 else (hu, wu)


def llava_next_grid(inputs: dict, n: int, processor=None, *, max_tiles: int | None = None) -> GridInfo:
    """``[base k*k | anyres Hu x (Wu + 1 newline)]`` with the "default" feature strategy (no CLS).
    ``max_tiles``: LLaVA-OneVision's anyres_max_N (the anyres grid shrunk to about N tiles)."""
    pv = inputs["pixel_values"]
    n_views, tile = int(pv.shape[1]), int(pv.shape[-1])
    orig = tuple(int(x) for x in inputs["image_sizes"][0])
    if n_views == 1:  # base only, followed by a single newline token
        k = _isqrt_exact(n - 1)
        segs = (GridSegment("base", 0, k, k), GridSegment("newline", k * k, 1, 0, row_stride=1))
        return _check(GridInfo.build(k, k, "base+anyres", segs, n), n)
    k = None
    if processor is not None and getattr(processor, "patch_size", None):
        k = tile // int(processor.patch_size)
    elif processor is not None and getattr(processor, "num_image_tokens", None):
        k = _isqrt_exact(int(processor.num_image_tokens))
    if k is not None:
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution(list(orig), processor.image_processor.image_grid_pinpoints)
        hu, wu = _shrunk(*_unpadded(orig, (best_h // tile * k, best_w // tile * k)), k, max_tiles)
        return _llava_next_info(k, hu, wu, n, exact=True)
    # No processor: find the patch size and tile arrangement that reproduce the token count.
    found = set()
    for p in (d for d in range(1, tile + 1) if tile % d == 0):
        k = tile // p
        for r in (d for d in range(1, n_views) if (n_views - 1) % d == 0):
            hu, wu = _shrunk(*_unpadded(orig, (r * k, (n_views - 1) // r * k)), k, max_tiles)
            if k * k + hu * (wu + 1) == n:
                found.add((k, hu, wu))
    if not found:
        raise ValueError(f"cannot lay out {n} LLaVA-NeXT image tokens for pixel_values {tuple(pv.shape)}")
    k, hu, wu = sorted(found)[0]
    return _llava_next_info(k, hu, wu, n, exact=len(found) == 1)


def llava_onevision_grid(inputs: dict, n: int, processor=None) -> GridInfo:
    """LLaVA-NeXT's layout, its anyres grid shrunk as the processor's ``vision_aspect_ratio``
    ("anyres_max_9" by default) says."""
    ratio = str(getattr(processor, "vision_aspect_ratio", None) or "anyres_max_9")
    tiles = int(ratio.rsplit("_", 1)[-1]) if ratio.startswith("anyres_max_") else None
    return llava_next_grid(inputs, n, processor, max_tiles=tiles)


# ------------------------------------------------------------------------------------------- tiled


def _tiles_info(k: int, tr: int, tc: int, overview: str, n: int, exact: bool) -> GridInfo:
    segs = []
    for i in range(tr * tc):
        r, c = divmod(i, tc)
        segs.append(GridSegment("tile", i * k * k, k, k, box=(r / tr, c / tc, (r + 1) / tr, (c + 1) / tc)))
    segs.append(GridSegment(overview, tr * tc * k * k, k, k))
    info = GridInfo.build(tr * k, tc * k, "tiles", segs, n, range(tr * tc), (tr, tc), exact)
    return _check(info, n)


def _squarest(m: int) -> tuple[int, int]:
    r = max(d for d in range(1, math.isqrt(m) + 1) if m % d == 0)
    return r, m // r


def internvl_grid(inputs: dict, n: int, processor=None, image=None) -> GridInfo:
    """Tiles are ``<img> tile_0 .. tile_{T-1} [thumbnail] </img>`` with no separators, so the tile
    arrangement needs the original image size and the image processor's settings (``processor`` and
    ``image``); without them the squarest arrangement is assumed and ``exact`` is False."""
    n_views = int(inputs["pixel_values"].shape[0])
    if n % n_views:
        raise ValueError(f"{n} image tokens do not split evenly over {n_views} tiles")
    k = _isqrt_exact(n // n_views)
    if k is None:
        raise ValueError(f"{n // n_views} tokens per tile is not a square")
    if n_views == 1:
        return square_raster(n)
    m = n_views - 1
    if processor is not None and image is not None:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = processor.image_processor
        size = (ip.size["height"], ip.size["width"]) if isinstance(ip.size, dict) else (ip.size.height, ip.size.width)
        w, h = image.size
        tc, tr = get_optimal_tiled_canvas((h, w), size, ip.min_patches, ip.max_patches)
        if tr * tc == m:
            return _tiles_info(k, tr, tc, "thumbnail", n, exact=True)
    (tr, tc), exact = _match_thumbnail(inputs["pixel_values"])
    return _tiles_info(k, tr, tc, "thumbnail", n, exact=exact)


def _match_thumbnail(pv: torch.Tensor) -> tuple[tuple[int, int], bool]:
    """Pick the tile arrangement whose re-assembled mosaic, shrunk to one tile, best matches the
    thumbnail (the whole image at tile size). ``exact`` only when the winner is clearly better than the
    runner-up; pictures without structure (flat colour, noise) give no clear winner."""
    tiles, thumb = pv[:-1].float(), pv[-1:].float()
    m, _, th, tw = tiles.shape
    errs = {}
    for tr in (d for d in range(1, m + 1) if m % d == 0):
        tc = m // tr
        mosaic = tiles.reshape(tr, tc, 3, th, tw).permute(2, 0, 3, 1, 4).reshape(1, 3, tr * th, tc * tw)
        small = torch.nn.functional.interpolate(mosaic, size=(th, tw), mode="area")
        errs[(tr, tc)] = float((small - thumb).abs().mean())
    ranked = sorted(errs, key=errs.get)
    if len(ranked) > 1 and errs[ranked[0]] < 0.5 * errs[ranked[1]]:
        return ranked[0], True
    return _squarest(m), len(ranked) == 1


def image_token_runs(input_ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(sequence position, length) of each run of ``token_id`` in a 1-D id sequence."""
    pos = (input_ids == token_id).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for p in pos:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [tuple(r) for r in runs]


def guess_image_token_id(input_ids: torch.Tensor, n: int) -> int:
    """The id occurring exactly ``n`` times (the image placeholder), when unique."""
    ids, counts = torch.unique(input_ids, return_counts=True)
    cand = ids[counts == n].tolist()
    if len(cand) != 1:
        raise ValueError(f"cannot tell which token id is the image token ({len(cand)} ids occur {n} times)")
    return cand[0]


def idefics3_grid(inputs: dict, n: int, processor=None) -> GridInfo:
    """Sequence: for each tile row, ``(<fake><row_i_col_j><image>*k*k)`` per tile then ``\\n``; then
    ``\\n<fake><global-img><image>*k*k<fake>``. The tile arrangement is read from the ``<row_i_col_j>``
    tokens when ``processor`` is given, else from the separator lengths (a row break adds ``\\n``)."""
    pv = inputs["pixel_values"]
    n_views = int(pv.shape[1]) if pv.dim() == 5 else int(pv.shape[0])
    ids = inputs["input_ids"][0]
    tok_id = processor.image_token_id if processor is not None else guess_image_token_id(ids, n)
    runs = image_token_runs(ids, tok_id)
    if len(runs) != n_views or len({length for _, length in runs}) != 1:
        raise ValueError(f"expected {n_views} equal runs of image tokens, found lengths {[r[1] for r in runs]}")
    k = _isqrt_exact(runs[0][1])
    if k is None:
        raise ValueError(f"{runs[0][1]} tokens per tile is not a square")
    if n_views == 1:
        return square_raster(n)
    m = n_views - 1
    if processor is not None:
        names = processor.tokenizer.convert_ids_to_tokens([int(ids[pos - 1]) for pos, _ in runs[:m]])
        rc = [tuple(int(x) for x in nm.strip("<>").replace("row_", "").split("_col_")) for nm in names]
        tr, tc = max(r for r, _ in rc), max(c for _, c in rc)
        return _tiles_info(k, tr, tc, "global", n, exact=tr * tc == m)
    # Between tiles of one row the separator is exactly <fake><row_i_col_j> (2 tokens); a row break adds
    # the newline token(s). If even the break before the global image is 2 tokens, newlines are not
    # visible as tokens and the arrangement cannot be read off the sequence.
    gaps = [runs[i + 1][0] - (runs[i][0] + runs[i][1]) for i in range(m)]
    if gaps[-1] > 2:
        tc = next((i + 1 for i, g in enumerate(gaps[:-1]) if g != 2), m)
        if m % tc == 0 and all((g == 2) == ((i + 1) % tc != 0) for i, g in enumerate(gaps[:-1])):
            return _tiles_info(k, m // tc, tc, "global", n, exact=True)
    tr, tc = _squarest(m)
    return _tiles_info(k, tr, tc, "global", n, exact=False)


def gemma3_grid(inputs: dict, n: int) -> GridInfo:
    """One pooled square per image (``mm_tokens_per_image``, e.g. 256 = 16 x 16), raster order. With
    pan-and-scan crops the first block (the whole image) is the primary grid and each crop is one more
    segment (its box in the image is not recoverable from the inputs; reported as the full image)."""
    tt = inputs.get("token_type_ids")
    if tt is None:
        return square_raster(n)
    runs = image_token_runs(tt[0], 1)
    if len(runs) == 1:
        return square_raster(n)
    k = _isqrt_exact(runs[0][1])
    segs = tuple(GridSegment("image" if i == 0 else "crop", i * k * k, k, k) for i in range(len(runs)))
    return _check(GridInfo.build(k, k, "tiles", segs, n, exact=False), n)
