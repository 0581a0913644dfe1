"""Server-side run store: browser sessions hold run ids, the server holds the runs.

* :class:`Entry` -- one run as a session sees it: the (read-only) Run, the results of
  experiments this session ran on it (``extras``), and a ``derived`` cache of things that
  depend on the run alone (figures, LLaVA-CAM), computed once.
* :class:`RunStore` -- a bounded, thread-safe LRU of entries keyed by random ids. A session
  only learns the ids of runs it captured or opened, so two sessions never see each
  other's captures (saved runs are shared through the runs directory).
* :class:`RunsDir` -- the ``--runs`` folder: list, open (validated, cached per file
  version), save under a checked name, with the sweep results next to each run.
"""
from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..run import Run, RunFormatError
from ..run_files import is_run_dir, load_run, save_run
from ..findings import headline_sweep
from ..run_files import EXTRAS_FILE, SWEEP_FILE, read_extras, read_json, sweep_file, sweeps_of

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Derived:
    """Thread-safe compute-once cache (per key) shared by every entry of one Run."""

    def __init__(self) -> None:
        self._values: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()

    def get(self, key, compute: Callable[[], Any]):
        with self._guard:
            if key in self._values:
                return self._values[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one computation per key; others wait for it
            with self._guard:
                if key in self._values:
                    return self._values[key]
            value = compute()
            with self._guard:
                self._values[key] = value
            return value

    def peek(self, key, default=None):
        with self._guard:
            return self._values.get(key, default)

    def put(self, key, value) -> None:
        with self._guard:
            self._values[key] = value


@dataclass
class Entry:
    id: str
    run: Run
    label: str
    source: str                                   # "capture", "saved:<name>"
    derived: Derived = field(default_factory=Derived)
    extras: dict = field(default_factory=dict)    # this session's experiment results (JSON-able)
    owner: str | None = None                      # the browser session that made or opened it
    video: object = None                          # a video run's Video (the run keeps its contact sheet only)

    def rerun_input(self):
        """The input to re-run: the run's image, or the video it was captured from (an InputError for a
        video run opened from disk, whose frames were not stored)."""
        if not self.run.meta.get("video"):
            return self.run.image
        if self.video is None:
            raise InputError("this video run was opened from its files, which keep one frame per temporal slot, not"
                             " the video: capture it again from the video to run experiments on it")
        return self.video

    @property
    def sweeps(self) -> dict:
        """mode -> sweep: every mode's sweep of this run (none overwrites another)."""
        return sweeps_of(self.extras)

    @property
    def sweep(self) -> dict | None:
        """The drop (else remove) sweep: the one the cliff, VTW and compute headlines read."""
        return headline_sweep(self.sweeps)


def run_bytes(run) -> int:
    arrays = getattr(run, "arrays", None) or {}
    return int(sum(getattr(a, "nbytes", 0) for a in arrays.values()))


class RunStore:
    """Bounded LRU ``id -> Entry``, shared fairly between sessions.

    At most ``capacity`` entries and about ``max_bytes`` of arrays in all, and at most
    ``per_owner`` entries per session (``owner``). When a session goes over its share, its own
    least recently used entry goes; when the store is full, the least recently used entry of
    the session holding the most goes. So one busy client evicts its own runs, never the last
    few of everybody else. The newest entry always stays; ``get`` of an evicted id raises
    InputError.
    """

    def __init__(self, capacity: int = 64, max_bytes: float = 2e9, per_owner: int = 12) -> None:
        self.capacity = int(capacity)
        self.max_bytes = float(max_bytes)
        self.per_owner = int(per_owner)
        self._entries: "OrderedDict[str, Entry]" = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def _victim(self, newest: Entry) -> str | None:
        """The id to evict (None: nothing must go). Called with the lock held."""
        mine = [e for e in self._entries.values() if e.owner == newest.owner and e is not newest]
        if newest.owner is not None and len(mine) + 1 > self.per_owner and mine:
            return mine[0].id
        if len(self._entries) <= self.capacity and sum(self._bytes.values()) <= self.max_bytes:
            return None
        counts: dict = {}
        for e in self._entries.values():
            counts[e.owner] = counts.get(e.owner, 0) + 1
        heaviest = max(counts, key=lambda o: counts[o])
        for e in self._entries.values():        # least recently used first
            if e.owner == heaviest and e is not newest:
                return e.id
        return next((i for i in self._entries if i != newest.id), None)

    def add(self, run: Run, *, label: str, source: str = "capture", derived: Derived | None = None,
            extras: dict | None = None, owner: str | None = None, video=None) -> Entry:
        entry = Entry(uuid.uuid4().hex, run, label, source, derived or Derived(), dict(extras or {}), owner, video)
        with self._lock:
            self._entries[entry.id] = entry
            self._bytes[entry.id] = run_bytes(run)
            while len(self._entries) > 1:
                old = self._victim(entry)
                if old is None:
                    break
                self._entries.pop(old)
                self._bytes.pop(old, None)
        return entry

    def get(self, run_id: str | None) -> Entry:
        if not run_id:
            raise InputError("no run yet: capture one (Run) or open a saved run in the Runs tab")
        with self._lock:
            entry = self._entries.get(run_id)
            if entry is not None:
                self._entries.move_to_end(run_id)
        if entry is None:
            raise InputError("this run is no longer in the server's memory (too many runs since);"
                             " capture it again or open a saved run")
        return entry

    def has(self, run_id: str | None) -> bool:
        with self._lock:
            return bool(run_id) and run_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def check_run_name(name: str) -> str:
    """A run name is one folder name: letters, digits, '.', '_', '-'; no '/', no '..'."""
    name = (name or "").strip()
    if not name:
        raise InputError("type a name for the run (letters, digits, '.', '_' or '-')")
    if "/" in name or "\\" in name or ".." in name or not NAME_RE.match(name):
        raise InputError(f"invalid run name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
                         " (no '/', no '..', not starting with '.')")
    return name


class RunsDir:
    """The folder of saved runs. Opening validates the run (RunFormatError on a bad one) and
    keeps the loaded Run per file version, so every session opening it shares one copy."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._loaded: dict[str, tuple[tuple, Run, Derived, dict]] = {}
        self._lock = threading.Lock()

    def _inside(self, p: Path) -> bool:
        """A run folder must stay inside the runs folder (a symlink out of it is not a run here)."""
        try:
            return p.resolve().is_relative_to(self.path.resolve())
        except OSError:
            return False

    def names(self) -> list[str]:
        if self.path is None or not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if not p.name.startswith(".") and is_run_dir(p) and self._inside(p))

    def table_markdown(self) -> str:
        """One row per run of the folder: prompt, generation, model, layers, whether a truncation
        sweep is stored (read from run.json / sweep.json only; arrays are not loaded)."""
        rows = ["| run | prompt | generation | model | layers | sweeps | link |", "|---|---|---|---|---|---|---|"]
        for name in self.preferred_order():
            d = self.path / name
            try:
                doc = read_json(d / "run.json")
                meta = doc.get("meta", {})
                gen = str(doc.get("generated_text", ""))
                cells = [name, str(meta.get("prompt", "")), gen if len(gen) < 60 else gen[:57] + "…",
                         str(meta.get("model", "")), str(meta.get("n_layers", "")),
                         ", ".join(sorted(sweeps_of(read_extras(d)))) or "—", f"[?run={name}](?run={name})"]
            except (OSError, ValueError, AttributeError, RunFormatError):
                cells = [name, "(unreadable run.json)", "", "", "", "", ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        return "\n".join(rows) if len(rows) > 2 else "_No saved runs in this folder yet._"

    def preferred_order(self, model: str | None = None) -> list[str]:
        """Run names, those listed in ``index.json`` (make-cached-runs' order) first, and of
        those the runs made with ``model`` (the loaded one) before the others."""
        names = self.names()
        try:
            listed = [(r["name"], r.get("model")) for r in read_json(self.path / "index.json")["runs"]]
        except (OSError, TypeError, ValueError, KeyError, AttributeError, RunFormatError):
            listed = []
        listed.sort(key=lambda nm: model is None or nm[1] != model)          # stable: index order kept
        first = [n for n, _ in listed if n in names]
        return first + [n for n in names if n not in first]

    def _dir(self, name: str) -> Path:
        name = check_run_name(name)
        if self.path is None:
            raise InputError("no runs folder is configured (start the app with --runs DIR)")
        d = self.path / name
        if not is_run_dir(d):
            raise InputError(f"there is no run named {name!r} in {self.path}")
        if not self._inside(d):
            raise InputError(f"run {name!r} is a link to a folder outside {self.path}; runs are only opened from"
                             " inside the runs folder")
        return d

    @staticmethod
    def _version(d: Path) -> tuple:
        def mt(p: Path):
            return p.stat().st_mtime_ns if p.exists() else 0
        return (mt(d / "run.json"), mt(d / "arrays.safetensors"), mt(d / EXTRAS_FILE),
                *(mt(d / f) for f in (SWEEP_FILE, *(sweep_file(m) for m in ("drop", "remove", "freeze")))))

    def open(self, name: str) -> tuple[Run, Derived, dict]:
        """(run, shared derived cache, extras from disk: ``sweep`` and any stored results)."""
        d = self._dir(name)
        version = self._version(d)
        with self._lock:
            hit = self._loaded.get(name)
            if hit is not None and hit[0] == version:
                return hit[1], hit[2], dict(hit[3])
        run = load_run(d)
        extras = read_extras(d)
        run.meta.setdefault("label", name)
        with self._lock:
            self._loaded[name] = (version, run, Derived(), extras)
            return run, self._loaded[name][2], dict(extras)

    def save(self, name: str, run: Run, extras: dict | None = None) -> Path:
        name = check_run_name(name)
        if self.path is None:
            raise InputError("no runs folder is configured (start the app with --runs DIR)")
        dest = self.path / name
        if dest.exists() or dest.is_symlink():
            raise InputError(f"a run named {name!r} already exists in {self.path}; choose another name")
        try:
            return save_run(run, dest, overwrite=False, extras=extras)   # one atomic step
        except FileExistsError:
            raise InputError(f"a run named {name!r} already exists in {self.path}; choose another name") from None
