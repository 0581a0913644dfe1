"""Datasets in the forms users have: a JSONL / CSV / parquet manifest, an image folder with a
metadata file, or a HuggingFace ``datasets`` dataset saved with ``save_to_disk``.

Every row becomes an :class:`Item`: an image (a path inside the dataset's folder, or a PIL image
for ``datasets``), a prompt, the reference answers (one or many), optional choices and an
optional task. Column names accepted (first match wins):

* image: ``image``, ``image_path``, ``file_name``, ``file``, ``path``
* prompt: ``prompt``, ``question``, ``instruction``, ``text``
* answers: ``answers`` (a list, or a JSON list in a CSV cell) or ``answer`` (one string;
  ``|`` separates several in CSV)
* choices: ``choices`` / ``options`` (a list, or a JSON list in a CSV cell); task: ``task``;
  id: ``id`` / ``question_id`` (default: the row number)

Bad rows -- missing or unreadable image, an image path that leaves the dataset's folder, empty
prompt, wrong types -- are reported with their row number (1-based, as an editor shows them;
for CSV the header is row 1). ``on_bad_row="skip"`` keeps the rest and lists what was skipped
and why; ``"fail"`` refuses the dataset with the first reasons. Nothing is dropped silently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

BAD_ROW_POLICIES = ("skip", "fail")
IMAGE_COLUMNS = ("image", "image_path", "file_name", "file", "path")
PROMPT_COLUMNS = ("prompt", "question", "instruction", "text")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "manifest.jsonl", "manifest.csv")
#: a manifest larger than this is refused (a study reads it whole)
MAX_MANIFEST_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Item:
    id: str
    row: int
    image: object            # absolute path (str) inside the dataset folder, or a PIL image
    prompt: str
    answers: tuple = ()
    choices: tuple = ()
    task: str | None = None


@dataclass
class Dataset:
    source: str
    format: str
    items: list[Item]
    skipped: list[dict] = field(default_factory=list)    # {"row", "reason"}
    fingerprint: str = ""                                # sha256 of the manifest / dataset files

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        s = f"{len(self.items)} rows from {self.source} ({self.format})"
        if self.skipped:
            why: dict[str, int] = {}
            for b in self.skipped:
                key = b["reason"].split(":")[0]
                why[key] = why.get(key, 0) + 1
            s += f"; skipped {len(self.skipped)}: " + ", ".join(f"{n} × {k}" for k, n in why.items())
        return s


def _first(row: dict, names) -> object:
    for n in names:
        v = row.get(n)
        if v is not None and not (isinstance(v, float) and v != v):    # NaN from parquet/pandas is "missing"
            return v
    return None


def _listish(v, *, csv_cell: bool, split_bar: bool) -> tuple | None:
    """A list of strings from a list, a JSON list in a string, or a plain string."""
    if v is None:
        return ()
    if hasattr(v, "tolist") and not isinstance(v, str):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        if not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v):
            return None
        return tuple(str(x) for x in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (str(v),)
    if not isinstance(v, str):
        return None
    s = v.strip()
    if csv_cell and s.startswith("["):
        try:
            parsed = json.loads(s)
        except json.JSONDecodeError:
            return None
        return _listish(parsed, csv_cell=False, split_bar=False)
    if split_bar and "|" in s:
        return tuple(x.strip() for x in s.split("|") if x.strip())
    return (s,) if s else ()


def _inside(root: Path, rel: str) -> Path | None:
    """``rel`` resolved under ``root``; None when it leaves the folder (``..``, absolute, links out)."""
    p = Path(rel)
    if p.is_absolute():
        return None
    try:
        full = (root / p).resolve()
        full.relative_to(root.resolve())
    except (ValueError, RuntimeError, OSError):     # outside the folder, or a symlink loop
        return None
    return full


def _check_image(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    from .images import MAX_PIXELS

    try:
        if not path.is_file():
            return f"missing image: {path.name} not found"
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                return f"image too large: {path.name} is {im.width}x{im.height}, more than {MAX_PIXELS:,} pixels"
            im.verify()
    except Image.DecompressionBombError:
        return f"image too large: {path.name} (more pixels than {MAX_PIXELS:,}; a decompression bomb?)"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError) as e:
        return f"unreadable image: {path.name} ({type(e).__name__})"
    return None


def _item(i: int, raw: dict, root: Path | None, *, csv_cell: bool, check_images: bool) -> tuple[Item | None, str | None]:
    img = _first(raw, IMAGE_COLUMNS)
    if img is None:
        return None, f"no image column (one of {', '.join(IMAGE_COLUMNS)})"
    if isinstance(img, dict) and "bytes" in img:          # a datasets Image feature, not decoded
        import io

        from PIL import Image

        try:
            img = Image.open(io.BytesIO(img["bytes"]))
            img.load()
        except Exception as e:      # noqa: BLE001 - any decoding failure is this row's problem
            return None, f"unreadable image: {type(e).__name__}"
    if isinstance(img, str):
        if root is None:
            return None, "image is a path, but the dataset has no folder to resolve it in"
        full = _inside(root, img)
        if full is None:
            return None, f"image path leaves the dataset folder (or is a symlink loop): {img!r}"
        if check_images:
            bad = _check_image(full)
            if bad:
                return None, bad
        img = str(full)
    elif not hasattr(img, "convert"):
        return None, f"wrong type for image: {type(img).__name__}"
    prompt = _first(raw, PROMPT_COLUMNS)
    if not isinstance(prompt, str):
        return None, "no prompt" if prompt is None else f"wrong type for prompt: {type(prompt).__name__}"
    if not prompt.strip():
        return None, "empty prompt"
    answers = _listish(_first(raw, ("answers",)), csv_cell=csv_cell, split_bar=False)
    if answers == ():
        answers = _listish(_first(raw, ("answer", "label")), csv_cell=csv_cell, split_bar=csv_cell)
    if answers is None:
        return None, "wrong type for answer(s): expected a string or a list of strings"
    choices = _listish(_first(raw, ("choices", "options")), csv_cell=csv_cell, split_bar=False)
    if choices is None:
        return None, "wrong type for choices: expected a list of strings"
    task = _first(raw, ("task",))
    if task is not None and not isinstance(task, str):
        return None, f"wrong type for task: {type(task).__name__}"
    ident = _first(raw, ("id", "question_id"))
    return Item(str(ident) if ident is not None else str(i), i, img, prompt.strip(), answers, choices, task or None), None


def _sha(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _rows_jsonl(path: Path):
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        raise InputError(f"{path} is one JSON array; vlmlens reads JSONL: one JSON object per line (e.g. python -c"
                         " \"import json,sys; [print(json.dumps(r)) for r in json.load(sys.stdin)]\" < in.json > out.jsonl)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"not JSON ({e.msg})"
                continue
            except RecursionError:
                yield n, None, "JSON nested too deeply"
                continue
            yield n, row, None if isinstance(row, dict) else "not a JSON object"


CSV_FIELD_LIMIT = 64 * 1024 * 1024      # csv's default (131,072 characters) refuses long questions


def _rows_csv(path: Path):
    old = csv.field_size_limit()
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        # undecodable bytes are kept as escapes and make only their own row bad
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            n = 1
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise InputError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
                n += 1
                cells = [str(v) for v in row.values() if v is not None] + [str(k) for k in row if k is not None]
                if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
                    yield n, None, "not UTF-8 text; save the file as UTF-8"
                    continue
                yield n, dict(row), None
    finally:
        csv.field_size_limit(old)


def _rows_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"reading parquet needs pyarrow: pip install pyarrow ({e})") from None
    n = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):     # streamed: a limit reads no more
            for row in batch.to_pandas().to_dict("records"):
                n += 1
                yield n, row, None
    except Exception as e:          # noqa: BLE001 - pyarrow's errors (ArrowInvalid, ...) for a bad file
        raise InputError(f"{path} is not a readable parquet file ({type(e).__name__}: {str(e)[:200]})") from None


def _rows_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise InputError("this folder is a HuggingFace dataset (save_to_disk); pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:          # noqa: BLE001 - a damaged save_to_disk folder (bad state.json, arrow files)
        raise InputError(f"{path} is not a readable saved dataset ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(f"{path} holds splits {sorted(ds)}; point at one split's folder")
        ds = next(iter(ds.values()))
    for n, row in enumerate(ds, 1):
        yield n, dict(row), None


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


def load_dataset(path, *, task: str | None = None, on_bad_row: str = "skip", check_images: bool = True,
                 limit: int | None = None) -> Dataset:
    """Read a dataset (see the module docstring); ``task`` fills rows that name none. ``limit``:
    stop after that many usable rows (the rest of the file is not read: rows are streamed)."""
    if on_bad_row not in BAD_ROW_POLICIES:
        raise InputError(f"--on-bad-row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    p = Path(path)
    try:
        p.resolve(strict=True)
    except FileNotFoundError:
        raise InputError(f"dataset {str(p)!r} not found") from None
    except (RuntimeError, OSError) as e:
        raise InputError(f"dataset {str(p)!r} cannot be opened ({type(e).__name__}: {e}; a symlink loop?)") from None
    if p.is_dir():
        if _is_saved_dataset(p):
            fmt, rows, root, files = "datasets", _rows_saved_dataset(p), p, [f for f in p.iterdir() if f.is_file()]
        else:
            meta = next((p / m for m in METADATA_FILES if (p / m).is_file()), None)
            if meta is None:
                raise InputError(f"{p} is a folder without a metadata file ({', '.join(METADATA_FILES)}) and is not a"
                                 " saved HuggingFace dataset")
            p = meta
    if p.is_file():
        if p.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"{p} is {p.stat().st_size:,} bytes; manifests up to {MAX_MANIFEST_BYTES:,} are read")
        suffix = p.suffix.lower()
        readers = {".jsonl": ("jsonl", _rows_jsonl), ".json": ("jsonl", _rows_jsonl), ".csv": ("csv", _rows_csv),
                   ".parquet": ("parquet", _rows_parquet)}
        if suffix not in readers:
            raise InputError(f"unknown dataset format {suffix!r}; use .jsonl, .csv, .parquet, an image folder with "
                             f"{METADATA_FILES[0]}, or a folder saved with datasets' save_to_disk")
        fmt, reader = readers[suffix]
        rows, root, files = reader(p), p.parent, [p]
    items, skipped, seen = [], [], set()
    for n, raw, err in rows:
        if limit is not None and len(items) >= limit:
            break
        if err is None:
            item, err = _item(n, raw, root, csv_cell=fmt == "csv", check_images=check_images)
            if item is not None and task and not item.task:
                item = Item(item.id, item.row, item.image, item.prompt, item.answers, item.choices, task)
            if item is not None and item.id in seen:
                item, err = None, f"duplicate id {item.id!r}"
        if err is not None:
            skipped.append({"row": n, "reason": err})
            if on_bad_row == "fail":
                raise InputError(f"{str(path)!r} row {n}: {err} (use --on-bad-row skip to leave bad rows out)")
            continue
        seen.add(item.id)
        items.append(item)
    if not items:
        why = f"; e.g. row {skipped[0]['row']}: {skipped[0]['reason']}" if skipped else ""
        raise InputError(f"{str(path)!r} has no usable rows{why}")
    return Dataset(os.fspath(path), fmt, items, skipped, _sha(files))
