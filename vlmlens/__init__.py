"""vlmlens: look inside a vision-language model's layers.

Public API::

    import vlmlens as vl
    lm = vl.load_model("tiny-shapes")            # or "random:llava", a hub id, a local dir
    run = vl.capture(lm, image, "What color is the circle?", max_new_tokens=8)
    vl.save_run(run, "runs/my-run"); run = vl.load_run("runs/my-run")

Headlines with their status (causal / measured / proxy / not found / unverified):
``vlmlens.findings.findings(run, sweep=..., extras=...)``.
"""
__version__ = "0.1.0"

from . import interventions  # noqa: E402
from .capture import capture  # noqa: E402  (binds the function over the submodule's name)
from .errors import InputError  # noqa: E402
from .images import load_image  # noqa: E402
from .interventions import Freeze, Knockout, SkipLayers, Substitute, Truncate  # noqa: E402
from .models.loading import EXAMPLES, LoadedModel, UnsupportedModel, load_model  # noqa: E402
from .run import Run, RunFormatError, TokenSpans, load_run, save_run  # noqa: E402
from .video import Video, load_video  # noqa: E402

__all__ = [
    "EXAMPLES",
    "InputError", "LoadedModel", "Run", "RunFormatError", "TokenSpans", "UnsupportedModel",
    "capture", "load_image", "load_model", "load_run", "load_video", "save_run", "interventions", "Video",
    "Truncate", "Freeze", "Substitute", "SkipLayers", "Knockout",
]
