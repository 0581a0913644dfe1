"""The vlmlens dashboard (Gradio). Only this package imports gradio.

``build_demo(model, device=..., runs_dir=..., no_model=...) -> gr.Blocks``; ``python app.py``
is the command line around it.
"""
from __future__ import annotations


def build_demo(*args, **kwargs):
    from .layout import build_demo as _build

    return _build(*args, **kwargs)


__all__ = ["build_demo"]
