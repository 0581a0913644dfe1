"""The files of a dataset study (see :mod:`vlmlens.experiments.dataset_study`): checking an output
directory, atomic writes, per-rank result lines that survive a crash, and reading a finished
study back without a model (the Study tab)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import InputError

CONFIG = "config.json"


def check_out(out: Path, config: dict, resume: bool) -> None:
    """Refuse an ``out`` this study cannot use (read only: every rank checks the same state)."""
    cfg = out / CONFIG
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a directory")
    if resume:
        if not cfg.is_file():
            raise InputError(f"--resume: {out} holds no study ({CONFIG} missing); run without --resume first")
        try:
            old = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--resume: {cfg} is not readable ({e})") from None
        diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff)
            raise InputError(f"--resume: {out} was made with other arguments ({shown}); use a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty; add --resume to continue the study there, or choose a new path")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_lines(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue                      # a line torn by a crash: that item runs again
        if isinstance(d, dict) and "id" in d:
            out.append(d)
    return out


def done_items(out: Path) -> dict[str, dict]:
    """Every finished item in the rank files (first record of an id wins)."""
    got: dict[str, dict] = {}
    for f in sorted(out.glob("results.rank*.jsonl")):
        for d in _read_lines(f):
            got.setdefault(str(d["id"]), d)
    return got


def _clean_rank_file(path: Path) -> None:
    """Drop a torn last line so that appending starts on a fresh line."""
    if path.is_file():
        lines = _read_lines(path)
        _atomic_write(path, "".join(json.dumps(d) + "\n" for d in lines))


def is_study_dir(path) -> bool:
    p = Path(path)
    return (p / "study.json").is_file() and (p / CONFIG).is_file()


def list_studies(root) -> list[Path]:
    """``root`` itself when it is a study directory, else the study directories right under it."""
    r = Path(root)
    if is_study_dir(r):
        return [r]
    if not r.is_dir():
        return []
    return sorted(p for p in r.iterdir() if p.is_dir() and not p.is_symlink() and is_study_dir(p))


def load_study(path):
    """A study directory's merged result (a DatasetStudy) and its per-row records (bounded reads;
    InputError when the directory is not a readable study)."""
    from ..run import RunFormatError
    from .dataset_study import DatasetStudy
    from ..run_files import read_json

    p = Path(path)
    if not is_study_dir(p):
        raise InputError(f"{p} is not a study directory (study.json and {CONFIG} expected)")
    try:
        d = read_json(p / "study.json", f"{p.name}/study.json")
        res = DatasetStudy(**d)
    except (RunFormatError, TypeError) as e:
        raise InputError(f"{p.name}/study.json is not a vlmlens study ({e})") from None
    return res, _read_lines(p / "results.jsonl")


def rows_csv(rows, columns) -> str:
    """Rows (dicts) as CSV text with ``columns`` in order (None and missing fields: empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()
