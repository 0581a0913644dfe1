"""The dashboard's model: loaded lazily in a background thread, used by one job at a time."""
from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from ..errors import InputError


class ModelHolder:
    """Loads ``name`` in a daemon thread (``start``) and hands it out under a lock (``use``).

    States: ``off`` (no model: teaching mode), ``loading``, ``ready``, ``failed``. The lens
    refuses two concurrent captures on one model, so every capture / experiment runs inside
    ``use()``, which serialises them (later jobs wait their turn).
    """

    def __init__(self, name: str | None, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, loader=None, off_reason: str | None = None,
                 adapter=None) -> None:
        self.name = name
        self.adapter = adapter             # LoRA adapters merged after loading (load_model's adapter=)
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self._loader = loader
        self._lm = None
        self._error: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._use = threading.Lock()
        self.load_seconds: float | None = None
        self.off_reason = off_reason if name is None else None
        if name is None:
            self._done.set()

    # ---- loading --------------------------------------------------------------------------
    def start(self) -> "ModelHolder":
        if self.name is not None and self._thread is None:
            self._thread = threading.Thread(target=self._load, name="vlmlens-model-loader", daemon=True)
            self._thread.start()
        return self

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            loader = self._loader
            if loader is None:
                from ..models.loading import load_model as loader
            extra = {"adapter": self.adapter} if self.adapter is not None else {}
            self._lm = loader(self.name, device=self.device, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                              **extra)
        except InputError as e:
            self._error = str(e)
        except Exception as e:  # a broken checkpoint, out of memory, ...: keep serving cached runs
            self._error = f"{type(e).__name__}: {e}"
        finally:
            self.load_seconds = time.perf_counter() - t0
            self._done.set()

    @property
    def state(self) -> str:
        if self.name is None:
            return "off"
        if not self._done.is_set():
            return "loading" if self._thread is not None else "idle"
        return "ready" if self._lm is not None else "failed"

    @property
    def lm(self):
        return self._lm

    @property
    def n_layers(self) -> int | None:
        return self._lm.n_layers if self._lm is not None else None

    def status_markdown(self) -> str:
        s = self.state
        if s == "off":
            return f"**Model:** none, cached runs only (teaching mode). {self.off_reason or ''}".strip()
        if s in ("loading", "idle"):
            return f"**Model:** `{self.name}` is loading… cached runs can be explored meanwhile."
        if s == "failed":
            return f"**Model:** `{self.name}` failed to load: {self._error}. Cached runs still work."
        lm = self._lm
        return (f"**Model:** `{lm.name}` ({lm.family}, {lm.n_layers} layers, {lm.device}, "
                f"{str(lm.dtype).replace('torch.', '')}) ready, loaded in {self.load_seconds:.1f} s.")

    def wait(self, timeout: float | None = None):
        """The loaded model; InputError when there is none (off, failed, or still loading)."""
        if self.name is None:
            raise InputError("this dashboard runs without a model (teaching mode: --no-model);"
                             " open a cached run in the Runs tab, or restart with --model")
        if self._thread is None:
            self.start()
        if not self._done.wait(timeout):
            raise InputError(f"the model {self.name!r} is still loading; try again in a moment")
        if self._lm is None:
            raise InputError(f"the model {self.name!r} could not be loaded ({self._error}); only cached runs are available")
        return self._lm

    @contextlib.contextmanager
    def use(self, timeout: float | None = 600.0):
        """Exclusive use of the model (waits for loading and for the job before this one)."""
        lm = self.wait(timeout)
        if not self._use.acquire(timeout=-1 if timeout is None else timeout):
            raise InputError("the model is busy with another job; try again in a moment")
        try:
            yield lm
        finally:
            self._use.release()


def resolve_model_name(name: str | None, no_model: bool) -> tuple[str | None, str | None]:
    """(model name to load or None, why there is none). A missing built-in tiny-shapes model
    turns into teaching mode with a message instead of a crash."""
    if no_model or not name:
        return None, "Started with --no-model."
    from ..models.loading import BUILTIN

    if name in BUILTIN and not Path(BUILTIN[name]).is_dir():
        return None, (f"The built-in model {name!r} is not present at {BUILTIN[name]} (train it with"
                      f" `python -m vlmlens.tiny train --out {BUILTIN[name]}`); serving cached runs only.")
    return name, None
