"""Run directories on disk: ``run.json`` + ``arrays.safetensors`` + ``image.png``.

Written to a temporary directory and renamed into place (never a partial run); read back
with every file, the format version, the payload type and every shape checked. No pickle.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .run import FORMAT_VERSION, RUN_FILES, Run, RunFormatError, TokenSpans
from .vocabulary import CUT_MODES


def check_run(run: Run) -> None:
    s = run.spans
    if len(run.tokens) != s.n_total or len(run.token_ids) != s.n_total:
        raise RunFormatError(f"tokens/token_ids have {len(run.tokens)}/{len(run.token_ids)} entries, spans say {s.n_total}")
    n_gen = s.n_total - s.n_prompt
    if len(run.token_logprobs) != n_gen:
        raise RunFormatError(f"token_logprobs has {len(run.token_logprobs)} entries for {n_gen} generated tokens")
    L = int(run.meta.get("n_layers", -1))
    if L <= 0:
        raise RunFormatError("meta['n_layers'] must be a positive integer")
    rows, cols = run.image_grid
    a = run.arrays
    if "image_grid_index" in a:
        gi = a["image_grid_index"]
        if gi.shape != (rows, cols) or gi.max(initial=-1) >= s.n_image or gi.min(initial=0) < -1:
            raise RunFormatError(f"image_grid_index has shape {gi.shape}; expected ({rows}, {cols}) with indices < {s.n_image}")
    elif rows * cols != s.n_image:
        raise RunFormatError(f"image grid {rows}x{cols} does not match {s.n_image} image tokens")
    if "hidden_states" in a:
        hs = a["hidden_states"]
        if hs.ndim != 3 or hs.shape[0] != L + 1 or hs.shape[1] != len(run.hidden_positions):
            raise RunFormatError(f"hidden_states has shape {hs.shape}; expected [{L + 1}, {len(run.hidden_positions)}, d_model]")
    if "attention_to_image" in a:
        at = a["attention_to_image"]
        if at.ndim != 3 or at.shape[0] != L or at.shape[2] != s.n_total:
            raise RunFormatError(f"attention_to_image has shape {at.shape}; expected [{L}, head, {s.n_total}]")
    if "attention_maps" in a:
        am = a["attention_maps"]
        nq = len(a.get("map_positions", []))
        if am.ndim != 3 or am.shape[0] != L or am.shape[1] != nq or am.shape[2] != s.n_image:
            raise RunFormatError(f"attention_maps has shape {am.shape}; expected [{L}, {nq}, {s.n_image}]")
    # analysis arrays (lens contributions, LLaVA-CAM, logit lens): None = any size
    P, n = len(a.get("logit_lens_positions", [])), s.n_image
    for k, want in {"attn_out": (L, None), "image_contrib": (L, None), "image_contrib_norm": (L, n), "llava_cam": (L, n), "image_kept": (L, n), "image_rows": (L,),
                    "attention_first_token": (L, None),
                    "logit_lens_ids": (L + 1, P, None), "logit_lens_probs": (L + 1, P, None), "logit_lens_target_probs": (L + 1, P),
                    "patch_lens_ids": (L + 1, n), "patch_lens_probs": (L + 1, n)}.items():
        if k in a and (a[k].ndim != len(want) or any(w is not None and w != g for w, g in zip(want, a[k].shape))):
            raise RunFormatError(f"{k} has shape {a[k].shape}; expected {tuple('*' if w is None else w for w in want)}")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def is_run_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "run.json").is_file()


#: run.json / sweep.json / extras.json larger than this are refused unread (a 7B run's run.json
#: is ~1 MB; its arrays live in safetensors)
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json(path: Path, what: str | None = None):
    """JSON of a file, bounded: too large, too deeply nested, not UTF-8 or not JSON is a
    RunFormatError naming the file (never a RecursionError or MemoryError)."""
    what = what or str(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RunFormatError(f"{what} cannot be read ({e.strerror or e})") from None
    if size > MAX_JSON_BYTES:
        raise RunFormatError(f"{what} is {size / 1e6:.0f} MB; JSON files of a run may be at most "
                             f"{MAX_JSON_BYTES / 1e6:.0f} MB")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFormatError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise RunFormatError(f"{what} is nested too deeply to be a vlmlens file") from None


def save_run(run: Run, path: str | os.PathLike, *, overwrite: bool = True, extras: dict | None = None) -> Path:
    """Write ``run`` (and ``extras``: ``sweep.json`` / ``extras.json``) to directory ``path`` in
    one atomic step: everything is written to a temp dir beside it, then renamed into place.

    ``path`` must not exist, or be an existing run directory (replaced when ``overwrite``).
    Anything else (a file, a non-run directory) is refused, and nothing is written. Without
    ``overwrite`` the final rename itself refuses an existing run, so of several concurrent
    saves to one new name exactly one succeeds; the others get FileExistsError and leave
    nothing behind.
    """
    from safetensors.numpy import save_file

    dest = Path(path)
    if dest.exists():
        if not is_run_dir(dest):
            raise FileExistsError(f"{dest} exists and is not a vlmlens run directory; choose another --out path")
        if not overwrite:
            raise FileExistsError(f"run directory {dest} already exists")
    check_run(run)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        doc = {
            "format": "vlmlens-run",
            "format_version": FORMAT_VERSION,
            "meta": _jsonable(run.meta),
            "tokens": list(run.tokens),
            "token_ids": [int(t) for t in run.token_ids],
            "spans": run.spans.to_json(),
            "image_grid": [int(run.image_grid[0]), int(run.image_grid[1])],
            "generated_text": run.generated_text,
            "token_logprobs": [float(x) for x in run.token_logprobs],
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in run.arrays.items()},
        }
        (tmp / "run.json").write_text(json.dumps(doc, indent=1, allow_nan=True))
        save_file({k: np.ascontiguousarray(v) for k, v in run.arrays.items()}, str(tmp / "arrays.safetensors"))
        run.image.convert("RGB").save(tmp / "image.png")
        write_extras(tmp, extras or {})
        os.chmod(tmp, 0o755)                   # mkdtemp makes it 0700; runs are shared read-only
        if overwrite and dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.rename(dest, old / "run")
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old / "run", dest)   # put the old run back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_new(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _rename_new(tmp: Path, dest: Path) -> None:
    """rename(tmp, dest) that never replaces a run: POSIX rename replaces only an *empty*
    directory, so an existing run makes it fail (ENOTEMPTY / EEXIST)."""
    import errno

    try:
        os.rename(tmp, dest)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(f"run directory {dest} already exists") from None
        raise


def load_run(path: str | os.PathLike) -> Run:
    """Read and validate a run directory written by :func:`save_run`.

    Raises RunFormatError (or FileNotFoundError) with a message naming what is wrong:
    a missing file, a non-JSON or wrong-version run.json, a payload that is not
    safetensors, arrays whose names/shapes/dtypes disagree with run.json.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    p = Path(path)
    try:
        is_dir = p.is_dir()
    except OSError as e:               # e.g. a name too long for the file system
        raise RunFormatError(f"cannot use {str(p)[:80]!r} as a run directory: {e.strerror or e}") from None
    if not is_dir:
        raise FileNotFoundError(f"run directory {p} does not exist")
    for name in RUN_FILES:
        if not (p / name).is_file():
            raise RunFormatError(f"{p} is not a complete run: missing {name}")
    doc = read_json(p / "run.json", f"{p}/run.json")
    if not isinstance(doc, dict) or doc.get("format") != "vlmlens-run":
        raise RunFormatError(f"{p}/run.json is not a vlmlens run file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise RunFormatError(
            f"{p} has run format version {doc.get('format_version')!r}; this vlmlens reads version {FORMAT_VERSION}"
            " (regenerate the run)"
        )
    try:
        arrays = load_file(str(p / "arrays.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunFormatError(f"{p}/arrays.safetensors is not a valid safetensors file ({e})") from None
    declared = doc.get("arrays", {})
    if set(declared) != set(arrays):
        raise RunFormatError(f"{p}: arrays {sorted(arrays)} do not match run.json's list {sorted(declared)}")
    for k, spec in declared.items():
        if list(arrays[k].shape) != list(spec["shape"]) or str(arrays[k].dtype) != spec["dtype"]:
            raise RunFormatError(
                f"{p}: array {k!r} has shape {list(arrays[k].shape)} {arrays[k].dtype}, run.json says {spec['shape']} {spec['dtype']}"
            )
    try:
        with Image.open(p / "image.png") as im:
            image = im.convert("RGB")
    except Exception as e:  # PIL raises several types for a broken file
        raise RunFormatError(f"{p}/image.png is not a readable image ({e})") from None
    try:
        run = Run(
            meta=dict(doc["meta"]),
            tokens=[str(t) for t in doc["tokens"]],
            token_ids=[int(t) for t in doc["token_ids"]],
            spans=TokenSpans.from_json(doc["spans"]),
            image_grid=(int(doc["image_grid"][0]), int(doc["image_grid"][1])),
            generated_text=str(doc["generated_text"]),
            token_logprobs=[float(x) for x in doc["token_logprobs"]],
            image=image,
            arrays=dict(arrays),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, RunFormatError):
            raise
        raise RunFormatError(f"{p}/run.json is missing or has a malformed field ({e!r})") from None
    check_run(run)
    return run


# ---- experiment results stored next to a run --------------------------------------------------

SWEEP_FILE = "sweep.json"            # one sweep of any mode (runs saved before sweeps per mode; read only)
EXTRAS_FILE = "extras.json"


def sweep_file(mode: str) -> str:
    """The file of a run's sweep in ``mode``: every mode's sweep is kept, none overwrites another."""
    if mode not in CUT_MODES:
        raise RunFormatError(f"unknown sweep mode {mode!r}")
    return f"sweep-{mode}.json"


def sweep_files(d: Path) -> list[Path]:
    return [p for p in [Path(d) / SWEEP_FILE, *(Path(d) / sweep_file(m) for m in CUT_MODES)] if p.is_file()]


def read_extras(d: Path) -> dict:
    """Results stored next to a run: its sweeps (``sweep-<mode>.json``, or an older ``sweep.json``)
    as ``extras["sweeps"]`` (mode -> sweep) and ``extras.json`` (other experiment results). A
    malformed file is a RunFormatError naming it."""
    out: dict = {}
    sweeps: dict = {}
    for p in [p for p in [Path(d) / EXTRAS_FILE] if p.is_file()] + sweep_files(d):
        doc = read_json(p)
        if not isinstance(doc, dict):
            raise RunFormatError(f"{p} must hold a JSON object")
        if p.name == EXTRAS_FILE:
            out.update({k: v for k, v in doc.items() if k not in ("sweep", "sweeps")})
            continue
        mode = doc.get("mode", "drop")
        if p.name != SWEEP_FILE and p.name != sweep_file(mode if mode in CUT_MODES else "drop"):
            raise RunFormatError(f"{p} holds a {mode!r} sweep")
        sweeps[mode] = doc
    if sweeps:
        out["sweeps"] = sweeps
    return out


def sweeps_of(extras: dict | None = None, sweep: dict | None = None) -> dict:
    """mode -> sweep of a run: ``extras["sweeps"]``, an older single ``extras["sweep"]`` (under its
    own mode), and ``sweep`` given directly (under its mode, replacing one of the same mode)."""
    out: dict = {}
    ex = extras or {}
    for s in [ex.get("sweep"), *(ex.get("sweeps") or {}).values(), sweep]:
        if isinstance(s, dict) and s.get("depths") is not None:
            out[str(s.get("mode", "drop"))] = s
    return out


def write_extras(d: Path, extras: dict) -> None:
    d = Path(d)
    for mode, doc in sweeps_of(extras).items():
        (d / sweep_file(mode)).write_text(json.dumps(doc, indent=1, allow_nan=True))
    rest = {k: v for k, v in extras.items() if k not in ("sweep", "sweeps") and v is not None}
    if rest:
        (d / EXTRAS_FILE).write_text(json.dumps(rest, indent=1, allow_nan=True))
