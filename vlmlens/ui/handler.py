"""The one error wrapper at the handler boundary of the dashboard."""
from __future__ import annotations

import functools
import logging
import time

import gradio as gr

from ..errors import InputError
from ..run import RunFormatError
from .panels import Missing

log = logging.getLogger("vlmlens.ui")
USER_ERRORS = (InputError, RunFormatError, FileNotFoundError, FileExistsError, Missing)


def handler(name: str):
    """Turn user errors into gr.Error, log the rest, and time the call (server-side)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            except gr.Error:
                raise
            except USER_ERRORS as e:
                msg = str(e) if not isinstance(e, KeyError) else str(e.args[0])
                raise gr.Error(msg, print_exception=False) from None
            except Exception as e:
                log.exception("handler %s failed", name)
                raise gr.Error(f"{name} failed: {type(e).__name__}: {e}") from None
            finally:
                self.timings[name].append(time.perf_counter() - t0)
        return wrapper
    return deco
