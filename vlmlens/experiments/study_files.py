"""The files of a dataset study (see :mod:`vlmlens.experiments.dataset_study`): checking an output
directory, atomic writes, per-rank result lines that survive a crash, and reading a finished
study back without a model (the Study tab)."""
from __future__ import annotations

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


LOCK = ".vlmlens-study.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                        # it exists, run by another user
    return True


def job_id(world: int = 1) -> str:
    """Who runs a study: one torchrun job (every rank alike) or one call in one process."""
    import socket
    import uuid

    if world > 1:
        e = os.environ
        return f"torchrun:{e.get('TORCHELASTIC_RUN_ID', '')}:{e.get('MASTER_ADDR', '')}:{e.get('MASTER_PORT', '')}"
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class StudyLock:
    """A study directory is owned by one process (or one torchrun job) at a time.

    ``LOCK`` in the directory names the holder (pid, host, job, start, command), written with
    O_EXCL so two starts cannot both take it. A second start is refused, naming the holder; a
    lock whose process is gone (same host, pid not running) is taken over and that is said; the
    holder removes it when it ends (also on an exception)."""

    def __init__(self, out: Path, job: str):
        self.path = Path(out) / LOCK
        self.job = job
        self.held = False

    def holder(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}                      # torn or foreign: treated as a lock of a process that is gone

    def _stale(self, h: dict) -> bool:
        import socket

        if not h:
            return True
        pid = h.get("pid")
        return h.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)

    def refusal(self, h: dict) -> str:
        return (f"{self.path.parent} is in use by another study: PID {h.get('pid')} on {h.get('host')} since"
                f" {h.get('started')} ({str(h.get('command', ''))[:120]}); wait for it to finish, or use another --out"
                f" (if that process is gone from another machine, delete {self.path})")

    def check(self) -> None:
        """Read only (every rank, before anyone writes): refuse when another live holder owns it."""
        h = self.holder()
        if h is not None and h.get("job") != self.job and not self._stale(h):
            raise InputError(self.refusal(h))

    def acquire(self) -> str | None:
        """Take the lock; a note when a stale one was taken over (InputError when it is held)."""
        import socket
        import sys
        import time

        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                h = self.holder()
                if h is None:
                    continue
                if h.get("job") == self.job:
                    self.held = True
                    return note
                if not self._stale(h):
                    raise InputError(self.refusal(h)) from None
                note = (f"took over the lock of {self.path.parent} from PID {h.get('pid')} (started"
                        f" {h.get('started')}), which is no longer running; its finished rows are kept")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "job": self.job,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:500]}, f)
            self.held = True
            return note
        raise InputError(f"could not take the lock of {self.path.parent}: another study keeps taking it")

    def release(self) -> None:
        if self.held:
            h = self.holder()
            if h is not None and h.get("job") == self.job:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self.held = False


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
