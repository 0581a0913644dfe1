"""vlmlens: look inside a vision-language model's layers.

Public API::

    import vlmlens as vl
    lm = vl.load_model("tiny-shapes")            # or "random:llava", a hub id, a local dir
    run = vl.capture(lm, image, "What color is the circle?", max_new_tokens=8)
    vl.save_run(run, "runs/my-run"); run = vl.load_run("runs/my-run")

Headlines with their status (causal / measured / proxy / not found / unverified):
``vlmlens.findings.findings(run, sweep=..., extras=...)``.

The names below are imported on first use (``import vlmlens`` and ``python -m vlmlens --help``
do not load torch).
"""
from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__


def _no_telemetry() -> None:
    """No telemetry unless the user asks for it: the HF hub client otherwise adds the torch version to
    its requests and fetches a registry of coding agents from the hub once a day (even for a
    ``local_files_only`` load), and gradio reports usage. A user's own setting of these variables wins."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:         # imported before vlmlens: its constant was read from the old environment
        constants.HF_HUB_DISABLE_TELEMETRY = os.environ["HF_HUB_DISABLE_TELEMETRY"].strip().lower() in (
            "1", "true", "yes", "on")


_no_telemetry()

#: public name -> the module that defines it
_WHERE = {
    "capture": "capture", "InputError": "errors", "load_image": "images", "Video": "video", "load_video": "video",
    "EXAMPLES": "models.loading", "LoadedModel": "models.loading", "UnsupportedModel": "models.loading",
    "load_model": "models.loading", "Run": "run", "RunFormatError": "run", "TokenSpans": "run",
    "load_run": "run_files", "save_run": "run_files",
    "Truncate": "interventions", "Freeze": "interventions", "Substitute": "interventions",
    "SkipLayers": "interventions", "Knockout": "interventions",
}

__all__ = ["__version__", "interventions", *_WHERE]


class _Package(types.ModuleType):
    """``vlmlens.capture`` is the function: importing the submodule of the same name (which the
    import system then binds on the package) leaves the function in place."""

    def __getattr__(self, name: str):
        if name in _WHERE:
            if name == "load_model":    # a model is loaded to be captured: the capture modules come with it, at
                importlib.import_module(f"{__name__}.capture")      # load, not in a script's first capture
            value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
            types.ModuleType.__setattr__(self, name, value)
            return value
        if name == "interventions":
            return importlib.import_module(f"{__name__}.interventions")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
