"""vlmlens: look inside a vision-language model's layers.

Public API::

    import vlmlens as vl
    lm = vl.load_model("tiny-shapes")            # or "random:llava", a hub id, a local dir
    run = vl.capture(lm, image, "What color is the circle?", max_new_tokens=8)
    vl.save_run(run, "cached_runs/my-run"); run = vl.load_run("cached_runs/my-run")
"""
__version__ = "0.1.0"

from .run import Run, RunFormatError, TokenSpans, load_run, save_run  # noqa: E402

_LAZY = {
    "load_model": ("vlmlens.models.loading", "load_model"),
    "LoadedModel": ("vlmlens.models.loading", "LoadedModel"),
    "UnsupportedModel": ("vlmlens.models.loading", "UnsupportedModel"),
    "capture": ("vlmlens.capture", "capture"),
    "load_image": ("vlmlens.capture", "load_image"),
    "InputError": ("vlmlens.errors", "InputError"),
}


def __getattr__(name):  # torch/transformers load only when first needed
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'vlmlens' has no attribute {name!r}")


__all__ = ["Run", "RunFormatError", "TokenSpans", "load_run", "save_run", *_LAZY]
