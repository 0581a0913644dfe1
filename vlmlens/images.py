"""Turning whatever a user hands us into an RGB PIL image, or a clear error."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 64_000_000  # refuse decompression bombs with a readable message


def to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any PIL mode to RGB. Returns (image, note) where note says what was converted."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), f"{mode} image composited on white"
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scale = 65535.0 if mode.startswith("I;16") else (hi - lo if hi > lo else 1.0)
        base = 0.0 if mode.startswith("I;16") else lo
        g = np.clip((a - base) / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB"), f"{mode} (high bit depth) image scaled to 8-bit gray"
    return im.convert("RGB"), f"{mode} image converted to RGB"


EXIF_ORIENTATION = 0x0112


def upright(im: Image.Image) -> tuple[Image.Image, str | None]:
    """Apply the EXIF orientation tag (phone photos are often stored sideways), so the model
    sees the image the way a viewer shows it. Returns (image, note or None)."""
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError):
        return im, None  # unreadable EXIF: keep the pixels as stored
    if orientation not in range(2, 9):
        return im, None
    return ImageOps.exif_transpose(im), f"turned upright from EXIF orientation {orientation}"


def _prepare(im: Image.Image) -> tuple[Image.Image, str | None]:
    im, turned = upright(im)
    im, converted = to_rgb(im)
    notes = [n for n in (turned, converted) if n]
    return im, "; ".join(notes) if notes else None


#: largest image file read (a photo is a few MB; the model sees it at a few hundred pixels)
MAX_FILE_BYTES = 50 * 1024 * 1024


def load_image(image) -> tuple[Image.Image, str | None]:
    """Accept a PIL image, a numpy array (HxW, HxWx3, HxWx4; uint8, uint16 or float in [0, 1])
    or a path; return an upright RGB PIL image and a note on any conversion made (EXIF
    orientation applied, mode converted).

    Raises:
        InputError: missing, empty or unreadable file; array of an unusable shape or dtype.
    """
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        try:
            kind = "file" if p.is_file() else "directory" if p.is_dir() else "other" if p.exists() else None
            size = p.stat().st_size if kind == "file" else 0
        except OSError as e:               # e.g. a name too long for the file system
            raise InputError(f"cannot use {str(p)[:80]!r} as an image path: {e.strerror or e}") from None
        if kind is None:
            raise InputError(f"image file {p} does not exist")
        if kind == "directory":
            raise InputError(f"{p} is a directory, not an image file")
        if kind == "other":
            raise InputError(f"{p} is not a regular file (a device or a pipe?); give an image file")
        if size == 0:
            raise InputError(f"image file {p} is empty (0 bytes)")
        if size > MAX_FILE_BYTES:
            raise InputError(f"image file {p} is {size / 1e6:.0f} MB; at most {MAX_FILE_BYTES / 1e6:.0f} MB")
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise InputError(f"image {p} is {im.width}x{im.height}; larger than {MAX_PIXELS} pixels")
                im.load()
                return _prepare(im.copy())
        except Image.DecompressionBombError:
            raise InputError(f"image {p} is too large to decode safely (a decompression bomb?)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"cannot read image {p}: not a supported image file ({e})") from None
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image))
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, SyntaxError) as e:
            raise InputError(f"cannot read image: {e}") from None
        if image.width == 0 or image.height == 0:
            raise InputError("image has zero width or height")
        return _prepare(image)
    if image is None:
        raise InputError("no image given; pass a PIL image, a numpy array or a file path")
    raise InputError(f"unsupported image type {type(image).__name__}; pass a PIL image, a numpy array or a file path")


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) == 0:
        raise InputError(f"image array has shape {a.shape}; expected HxW, HxWx3 or HxWx4")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError("image array contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise InputError("float image arrays must hold values in [0, 1]")
        a = np.round(a * 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a // 257).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InputError(f"image array dtype {a.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    mode = "L" if a.ndim == 2 else {3: "RGB", 4: "RGBA"}[a.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(a), mode)


def image_sha256(im: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
    return h.hexdigest()
