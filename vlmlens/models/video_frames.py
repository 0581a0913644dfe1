"""A video processor for the Qwen families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) without torchvision.

transformers 5's video processors all need torchvision, which vlmlens does not install. The model's
own video path needs little: every frame resized, rescaled and normalised as an image, then pairs of
frames (``temporal_patch_size``) stacked into one temporal patch. :class:`QwenFrames` does the
per-frame part with the checkpoint's own *image* processor (its PIL backend, the same resize and
normalisation), at the checkpoint's video pixel bounds, and stacks the frames itself; the family's
processor calls it in place of its video processor and expands ``<|video_pad|>`` as usual.
A video of one repeated frame therefore gives exactly the image's patches (tested).

Settings: ``patch_size``, ``merge_size``, ``temporal_patch_size``, mean and std come from the image
processor (released checkpoints use the same values for both); the pixel bounds from the
checkpoint's ``video_preprocessor_config.json`` where it has one (JSON), else the image processor's.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import BatchFeature
from transformers.video_utils import VideoMetadata

from ..errors import InputError

VIDEO_CONFIG = "video_preprocessor_config.json"


def _bounds(size) -> tuple[int, int]:
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    return int(get("shortest_edge")), int(get("longest_edge"))


class QwenFrames:
    """Callable as ``video_processor(videos, video_metadata=..., return_tensors=...)`` by a Qwen2-VL /
    Qwen2.5-VL processor: returns ``pixel_values_videos`` (patches, C * t * p * p), ``video_grid_thw``
    and ``video_metadata`` (which Qwen2.5-VL turns into ``second_per_grid_ts``)."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    num_frames = None       # read by some chat templates while rendering
    fps = None

    def __init__(self, image_processor, min_pixels: int, max_pixels: int):
        self.image_processor = image_processor
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)

    @classmethod
    def for_processor(cls, processor, folder: str | Path | None = None) -> "QwenFrames":
        ip = processor.image_processor
        lo, hi = _bounds(ip.size)
        cfg = Path(folder) / VIDEO_CONFIG if folder is not None else None
        if cfg is not None and cfg.is_file():
            d = json.loads(cfg.read_text())
            if "size" in d:
                lo, hi = _bounds(d["size"])
            lo, hi = int(d.get("min_pixels", lo)), int(d.get("max_pixels", hi))
        return cls(ip, lo, hi)

    def frame_patches(self, frame: np.ndarray) -> tuple[np.ndarray, int, int]:
        """One frame through the image processor: (gh/m, gw/m, m, m, C, p, p) float32, and (gh, gw)."""
        out = self.image_processor(images=[frame], return_tensors="np",
                                   size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})
        _, gh, gw = (int(x) for x in out["image_grid_thw"][0])
        m, p, t = self.merge_size, self.patch_size, self.temporal_patch_size
        a = out["pixel_values"].reshape(gh // m, gw // m, m, m, -1, t, p, p)
        return a[:, :, :, :, :, 0], gh, gw

    def __call__(self, videos, video_metadata=None, return_tensors=None, **_ignored) -> BatchFeature:
        if isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]
        metas = list(video_metadata) if video_metadata is not None else [None] * len(videos)
        if len(metas) != len(videos):
            raise InputError(f"{len(videos)} videos but {len(metas)} video_metadata entries")
        pixels, grids, out_meta = [], [], []
        t = self.temporal_patch_size
        for video, meta in zip(videos, metas):
            frames = [np.asarray(f) for f in video]
            if not frames:
                raise InputError("a video has no frames")
            per = [self.frame_patches(f) for f in frames]
            if len({(gh, gw) for _, gh, gw in per}) != 1:
                raise InputError("the frames of a video must share one size")
            arrays = [a for a, _, _ in per]
            arrays += [arrays[-1]] * (-len(arrays) % t)           # pad with the last frame, as the model's own does
            _, gh, gw = per[0]
            slots = [np.stack(arrays[i:i + t], axis=5) for i in range(0, len(arrays), t)]   # (.., C, t, p, p)
            pixels.append(np.concatenate([s.reshape(gh * gw, -1) for s in slots]))
            grids.append([len(slots), gh, gw])
            if meta is None:
                meta = VideoMetadata(total_num_frames=len(frames), fps=1.0, frames_indices=list(range(len(frames))))
            elif isinstance(meta, dict):
                meta = VideoMetadata(**meta)
            out_meta.append(meta)
        data = {"pixel_values_videos": np.concatenate(pixels).astype(np.float32),
                "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        feat = BatchFeature(data=data, tensor_type=return_tensors)
        feat["video_metadata"] = out_meta
        return feat


def attach_video_processor(processor, arch, folder: str | Path | None = None):
    """Give ``processor`` the family's torchvision-free video processor, where the family reads video
    through the lens (``arch.video``); returns ``processor``."""
    if arch.video == "qwen" and hasattr(processor, "image_processor") and not (
            folder is None and isinstance(getattr(processor, "video_processor", None), QwenFrames)):
        processor.video_processor = QwenFrames.for_processor(processor, folder)
    return processor

