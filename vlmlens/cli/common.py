"""What every command shares: the registry, the model and input arguments, the checks made before
any work (inputs, --out), the progress bar and torchrun's process group.

Nothing here imports torch or transformers at module level: ``python -m vlmlens --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError

#: name -> (fn(args) -> exit status, help); ``fn.configure(parser)`` adds its options
COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register ``fn(args)`` as a sub-command; ``fn.configure(parser)`` adds its options."""
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return deco


# ---- arguments ----------------------------------------------------------------------------------

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-shapes", help="tiny-shapes, random:<family>, a local dir or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--adapter", default=None, help="LoRA adapters to merge (a folder from `recover`, peft's format)")


def add_input_args(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", help="image file (png, jpg, ...)")
    which.add_argument("--video", help="video file (mp4, webm, ...; Qwen-VL family models), frames sampled evenly")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default 8)")
    p.add_argument("--prompt", required=True, help="question or instruction about the image")
    p.add_argument("--max-new-tokens", type=int, default=16)


def add_mode_arg(p: argparse.ArgumentParser, default: str = "drop", what: str = "how the image is cut") -> None:
    """--mode: drop / remove / freeze (the library's one list of cut modes)."""
    from ..vocabulary import CUT_MODES

    p.add_argument("--mode", default=default, help=f"{what}: one of {', '.join(CUT_MODES)} (default {default})")


def load_from_args(args):
    from ..models.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      adapter=getattr(args, "adapter", None))


# ---- checks made before a model is loaded ----------------------------------------------------------

def check_inputs(args) -> None:
    """Validate image (or video), prompt and token count before spending time on loading a model; the visual
    input is then ``args.visual`` (the image path, or the sampled Video)."""
    from ..capture import check_max_new_tokens, check_prompt
    from ..images import load_image
    from ..video import load_video

    if getattr(args, "video", None):
        args.visual = load_video(args.video, frames=args.frames)
    else:
        load_image(args.image)
        args.visual = args.image
    check_prompt(args.prompt)
    check_max_new_tokens(args.max_new_tokens)


RUN_MARKER = "run.json"


def check_out_dir(path: str, marker: str | None = None) -> Path:
    """``--out`` before any work is done: new, an empty directory, or one this command wrote before (it holds
    ``marker``). ``marker=None``: new or empty only. A run (``marker="run.json"``) must be new or a run."""
    p = Path(path)
    if marker is None:
        kind = "an empty directory"
    elif marker == RUN_MARKER:
        kind = "a vlmlens run directory"
    else:
        kind = f"an earlier output of this command (no {marker})"
    try:
        if p.exists():
            empty = p.is_dir() and not any(p.iterdir())
            ours = p.is_dir() and marker is not None and (p / marker).is_file()
            if not (ours or (empty and marker != RUN_MARKER)):
                raise InputError(f"--out {p} exists and is not {kind}; choose a new path")
        parent = next((a for a in p.parents if a.exists()), None)
    except OSError as e:
        raise InputError(f"--out {str(p)[:80]!r} cannot be used: {e.strerror or e}") from None
    if parent is not None and not parent.is_dir():
        raise InputError(f"--out {p}: {parent} is a file, so nothing can be written under it")
    return p


def check_tau(tau: float) -> float:
    if not tau > 0:
        raise InputError(f"--tau must be a positive number of nats, got {tau}")
    return tau


# ---- running ------------------------------------------------------------------------------------

def progress_bar(stream=None):
    """A progress callback ``(done, total, label)`` drawing a tqdm bar (with ETA) on stderr; a new
    bar starts whenever ``total`` changes (e.g. calibration, then the study)."""
    from tqdm import tqdm

    out = stream or sys.stderr
    state = {"bar": None, "total": None}

    def show(done: int, total: int, label: str) -> None:
        if state["bar"] is None or state["total"] != total:
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"], state["total"] = tqdm(total=total, file=out, dynamic_ncols=True, leave=True), total
        bar = state["bar"]
        bar.set_postfix_str(label[:40], refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state["bar"] = None
    return show


def distributed():
    """(rank, world, local_rank, barrier) under torchrun (torch.distributed initialised here), else single process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.barrier


def write_html(fig, path: Path) -> None:
    """A figure as HTML (plotly.js from its CDN: small), written whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.write_html(tmp, include_plotlyjs="cdn")
    tmp.replace(path)

