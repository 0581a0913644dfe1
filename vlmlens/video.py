"""Video input: frames sampled from a file (PyAV, no torchvision), or given as arrays / images.

A :class:`Video` is what capture reads instead of an image: a few RGB frames sampled uniformly
from the source, where each came from (source frame numbers and times), and a contact sheet --
one picture of the frames the model groups into one temporal slot, laid out as a grid -- that a
run keeps as its ``image.png`` and that every heatmap is drawn over (one heatmap per slot).

Bounds, so that one request cannot occupy the model without end: at most :data:`MAX_FRAMES`
sampled frames, a file of at most :data:`MAX_VIDEO_BYTES`, a source of at most
:data:`MAX_SOURCE_FRAMES` frames (decoding is sequential), frames of at most
:data:`~vlmlens.images.MAX_PIXELS` pixels.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .images import MAX_PIXELS, image_sha256, load_image
from .models.grids import frame_layout

DEFAULT_FRAMES = 8
MAX_FRAMES = 64
MAX_VIDEO_BYTES = 512 * 1024 * 1024
MAX_SOURCE_FRAMES = 60 * 60 * 30          # an hour at 30 frames per second
#: file types the dashboard's video upload offers (PyAV reads more)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg")
#: frames per second assumed where frames come without a frame rate (arrays, image lists)
ASSUMED_FPS = 1.0


@dataclass(frozen=True)
class Video:
    """Frames sampled from a video, in order. ``indices[i]`` is frame i's number in the source
    (0-based, decoding order), ``fps`` the source's frame rate (``ASSUMED_FPS`` where frames were
    given without one), ``n_source`` the source's frame count."""

    frames: tuple
    indices: tuple
    fps: float
    n_source: int
    note: str | None = None

    def __post_init__(self):
        if not self.frames:
            raise InputError("a video needs at least one frame")
        sizes = {f.size for f in self.frames}
        if len(sizes) != 1:
            raise InputError(f"the frames of a video must share one size, got {sorted(sizes)}")

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size

    @property
    def times(self) -> list[float]:
        """Seconds from the start of the source, one per sampled frame."""
        return [i / self.fps for i in self.indices]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled frames (what a model that encodes time reads)."""
        if len(self.indices) < 2:
            return self.fps
        return self.fps * (len(self.indices) - 1) / max(self.indices[-1] - self.indices[0], 1)

    def array(self) -> np.ndarray:
        """(frames, height, width, 3) uint8."""
        return np.stack([np.asarray(f, dtype=np.uint8) for f in self.frames])

    def sha256(self) -> str:
        h = hashlib.sha256(f"video{len(self.frames)}{self.size}{self.indices}{self.fps}".encode())
        for f in self.frames:
            h.update(f.tobytes())
        return h.hexdigest()

    def meta(self, per_slot: int) -> dict:
        """What a run records of its video (JSON)."""
        return {"frames": len(self.frames), "source_frames": self.n_source, "source_fps": round(self.fps, 6),
                "indices": [int(i) for i in self.indices], "times": [round(t, 4) for t in self.times],
                "frames_per_slot": int(per_slot), "slots": math.ceil(len(self.frames) / per_slot)}


def video_slots(inputs: dict) -> int | None:
    """Temporal slots of a video input (``video_grid_thw``'s t); None for an image."""
    thw = inputs.get("video_grid_thw")
    return int(thw[0][0]) if thw is not None else None


def input_sha256(image, rgb=None) -> str:
    """Fingerprint of a capture's visual input: every sampled frame of a video, or the image's pixels
    (``rgb``: the image already loaded, so that it is not read twice)."""
    if isinstance(image, Video):
        return image.sha256()
    return image_sha256(rgb if rgb is not None else load_image(image)[0])


def video_inputs(lm, video: Video, prompt: str) -> tuple[dict, Image.Image, str | None]:
    """The model inputs of ``video`` + ``prompt`` (the family's ``Arch.build_video_inputs``), the contact
    sheet at the processed frame size and the video's note; an InputError for a family that reads images only."""
    from .models.families import ARCHES

    if not lm.arch.video:
        raise InputError(f"{lm.name} ({lm.family}) reads images only through the lens; video input is supported"
                         f" for {', '.join(a.family for a in ARCHES.values() if a.video)}")
    inputs = dict(lm.arch.build_video_inputs(lm.processor, video, prompt))
    vp = lm.processor.video_processor
    _, gh, gw = (int(x) for x in inputs["video_grid_thw"][0])
    return inputs, contact_sheet(video, vp.temporal_patch_size, (gw * vp.patch_size, gh * vp.patch_size)), video.note


def sample_indices(n_source: int, n: int) -> list[int]:
    """``n`` frame numbers spread evenly over ``0..n_source-1`` (first and last included); all
    frames when the source has no more than ``n``."""
    if n_source <= n:
        return list(range(n_source))
    return [int(round(x)) for x in np.linspace(0, n_source - 1, n)]


def check_frames(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_FRAMES:
        raise InputError(f"frames must be an integer in 1..{MAX_FRAMES}, got {n!r}")
    return int(n)


def load_video(source, frames: int = DEFAULT_FRAMES) -> Video:
    """A :class:`Video` of ``frames`` frames sampled evenly from ``source``: a video file's path or
    bytes (any container and codec FFmpeg reads, through PyAV), a (T, H, W, 3) uint8 array, a
    list of images (anything :func:`vlmlens.images.load_image` takes), or a Video (returned as is).

    Raises:
        InputError: no such file, not a video, no video stream, too large or too long, frames of
            different sizes, or ``frames`` out of 1..MAX_FRAMES.
    """
    if isinstance(source, Video):
        return source
    n = check_frames(frames)
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise InputError(f"a video array must be (frames, height, width, 3) uint8, got {source.shape} {source.dtype}")
        source = list(source)
    if isinstance(source, (list, tuple)):
        if not source:
            raise InputError("the list of frames is empty")
        pick = sample_indices(len(source), n)
        imgs = [load_image(source[i])[0] for i in pick]
        return Video(tuple(imgs), tuple(pick), ASSUMED_FPS, len(source),
                     note=f"frames given without a frame rate: {ASSUMED_FPS:g} per second assumed")
    if isinstance(source, (bytes, bytearray)):
        if len(source) > MAX_VIDEO_BYTES:
            raise InputError(f"video is {len(source) / 1e6:.0f} MB; at most {MAX_VIDEO_BYTES / 1e6:.0f} MB")
        return _decode(lambda: io.BytesIO(bytes(source)), "the video bytes", n)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.is_file():
            raise InputError(f"video file {p} does not exist" if not p.exists() else f"{p} is not a regular file")
        size = p.stat().st_size
        if size == 0:
            raise InputError(f"video file {p} is empty (0 bytes)")
        if size > MAX_VIDEO_BYTES:
            raise InputError(f"video file {p} is {size / 1e6:.0f} MB; at most {MAX_VIDEO_BYTES / 1e6:.0f} MB")
        return _decode(lambda: str(p), f"video {p.name}", n)
    raise InputError(f"unsupported video type {type(source).__name__}; pass a file path, bytes, a (T, H, W, 3) uint8"
                     " array or a list of frames")


def _decode(opener, what: str, n: int) -> Video:
    import av

    try:
        with av.open(opener(), mode="r") as box:       # first pass: count frames without decoding them
            if not box.streams.video:
                raise InputError(f"{what} has no video stream")
            stream = box.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else ASSUMED_FPS
            total = 0
            for packet in box.demux(stream):
                if packet.size:
                    total += 1
                    if total > MAX_SOURCE_FRAMES:
                        raise InputError(f"{what} has more than {MAX_SOURCE_FRAMES:,} frames; cut it shorter")
        if total == 0:
            raise InputError(f"{what} holds no frames")
        want = sample_indices(total, n)
        wanted, got, last = set(want), {}, None
        with av.open(opener(), mode="r") as box:
            stream = box.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(box.decode(stream)):
                if frame.width * frame.height > MAX_PIXELS:
                    raise InputError(f"{what} has {frame.width}x{frame.height} frames; larger than {MAX_PIXELS} pixels")
                if i in wanted:
                    got[i] = frame.to_image().convert("RGB")
                last = i
                if i >= want[-1]:
                    break
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what}: not a video FFmpeg can decode ({e})") from None
    if not got:
        raise InputError(f"{what}: no frame could be decoded")
    note = None
    missing = [i for i in want if i not in got]
    if missing:      # a container that over-counts its packets: take the frames it did decode
        want = sample_indices(last + 1, n)
        if any(i not in got for i in want):
            raise InputError(f"{what}: {len(missing)} of the sampled frames could not be decoded")
        note = f"the container counted {total} frames, {last + 1} decoded"
        total = last + 1
    return Video(tuple(got[i] for i in want), tuple(want), fps, total, note=note)


# ----------------------------------------------------------------------------------- contact sheet


def contact_sheet(video: Video, per_slot: int, cell: tuple[int, int]) -> Image.Image:
    """One image of the slots' first frames, each resized to ``cell`` = (width, height) -- the size the
    model's processor gave the frames -- laid out by :func:`vlmlens.models.grids.frame_layout`, row-major."""
    firsts = list(video.frames[::per_slot])
    rows, cols = frame_layout(len(firsts))
    w, h = cell
    sheet = Image.new("RGB", (cols * w, rows * h))
    for i, f in enumerate(firsts):
        r, c = divmod(i, cols)
        sheet.paste(f.resize((w, h), Image.BICUBIC), (c * w, r * h))
    return sheet
