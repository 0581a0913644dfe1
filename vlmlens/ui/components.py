"""The dashboard's own input components: gradio's, with checks and API descriptions of their own.

Each is a template (``is_template``): the page draws it with gradio's component of the same kind.
"""
from __future__ import annotations

import gradio as gr


class CheckedImage(gr.Image):
    """gr.Image whose unreadable uploads become a clear gr.Error instead of a processing error."""

    is_template = True  # rendered by the frontend's Image component

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            name = getattr(payload, "orig_name", None) or "the upload"
            raise gr.Error(f"cannot read {name}: not a supported image file ({type(e).__name__})",
                           print_exception=False) from None


class LayerSlider(gr.Slider):
    """A layer slider whose range follows the run per session; the value is checked against
    the run in the handler (so API clients are not bound by the page's initial range)."""

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        try:
            v = float(payload)
            layer = int(v)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"layer must be a finite number, got {payload!r}", print_exception=False) from None
        if v != layer:                  # 2.5 is not a layer (no silent rounding)
            raise gr.Error(f"layer must be a whole number, got {payload!r}", print_exception=False)
        return layer


class CountSlider(gr.Slider):
    """A slider of a whole count (tokens, rows, batch size): a value from an API client that is
    not a whole number in range is refused by name, not with gradio's generic error."""

    is_template = True

    def preprocess(self, payload):
        what = (self.label or "value").lower()
        try:
            v = float(payload)
            n = int(v)
        except (TypeError, ValueError, OverflowError):
            raise gr.Error(f"{what} must be a whole number in {self.minimum:g}..{self.maximum:g}, got {payload!r}",
                           print_exception=False) from None
        if v != n or not self.minimum <= n <= self.maximum:
            raise gr.Error(f"{what} must be a whole number in {self.minimum:g}..{self.maximum:g}, got {payload!r}",
                           print_exception=False)
        return n


class VideoFile(gr.File):
    """A video upload. The API page says in a sentence what to send, instead of gradio's description of its
    file class (a docstring about server paths and attributes)."""

    is_template = True

    def api_info(self) -> dict:
        info = dict(super().api_info())
        info["additional_description"] = ("A video file (" + ", ".join(self.file_types or []) + "): a local path "
                                          "(gradio_client's handle_file) or a URL the server may read.")
        return info


class Download(gr.File):
    """A file the dashboard offers (a run's zip, a CSV, the figures): described on the API page by what a client
    gets back."""

    is_template = True

    def api_info(self) -> dict:
        info = dict(super().api_info())
        info["additional_description"] = (f"{self.label}: gradio_client downloads it and returns its local path "
                                          "(null when there is nothing to offer yet).")
        return info
