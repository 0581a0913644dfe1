"""Command line: ``python -m vlmlens <command> ...`` (the registry; ``__main__`` only calls :func:`main`).

Every user error (bad image, prompt, path, model name, setting) prints one ``error:`` line
and exits with status 2; no traceback, nothing half-written.
"""
from __future__ import annotations

import argparse
import sys

from .errors import InputError
from .run import RunFormatError

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register ``fn(args)`` as a sub-command; ``fn.configure(parser)`` adds its options."""
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return deco


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


def load_from_args(args):
    from .models.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      adapter=getattr(args, "adapter", None))


def check_inputs(args) -> None:
    """Validate image (or video), prompt and token count before spending time on loading a model; the visual
    input is then ``args.visual`` (the image path, or the sampled Video)."""
    from .capture import check_max_new_tokens, check_prompt
    from .images import load_image
    from .video import load_video

    if getattr(args, "video", None):
        args.visual = load_video(args.video, frames=args.frames)
    else:
        load_image(args.image)
        args.visual = args.image
    check_prompt(args.prompt)
    check_max_new_tokens(args.max_new_tokens)


def check_out_path(path: str) -> None:
    """--out must be new or an existing run directory (checked before any work is done)."""
    from pathlib import Path

    from .run import is_run_dir

    p = Path(path)
    try:
        if p.exists() and not is_run_dir(p):
            raise InputError(f"--out {p} exists and is not a vlmlens run directory; choose a new path")
        parent = next((a for a in p.parents if a.exists()), None)
    except OSError as e:
        raise InputError(f"--out {str(p)[:80]!r} cannot be used: {e.strerror or e}") from None
    if parent is not None and not parent.is_dir():
        raise InputError(f"--out {p}: {parent} is a file, so no run directory can be made under it")


@command("capture", "capture one run (hidden states, attention to the image) and save it")
def cmd_capture(args) -> int:
    from .capture import capture
    from .run import save_run

    if args.out:
        check_out_path(args.out)
    check_inputs(args)
    lm = load_from_args(args)
    run = capture(lm, args.visual, args.prompt, max_new_tokens=args.max_new_tokens, store=args.store)
    print(run.summary())
    if args.out:
        dest = save_run(run, args.out)
        print(f"saved:      {dest}")
    return 0


def _configure_capture(p):
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--out", help="directory to save the run in (new, or an existing run to replace)")
    p.add_argument("--store", default="all", choices=["all", "image_text", "none"], help="which hidden states to keep")


cmd_capture.configure = _configure_capture


@command("show", "print the summary of a saved run and its headlines (each with its status)")
def cmd_show(args) -> int:
    from .findings import findings
    from .run import load_run
    from .run_files import read_extras

    run = load_run(args.run)
    print(run.summary())
    extras = read_extras(args.run)
    print("headlines (causal: read off an intervention; measured; proxy; not found; unverified: run the experiment):")
    for f in findings(run, extras=extras):          # every mode's sweep is in extras["sweeps"]
        print(f"  {f.title} [{f.status}]: {f.text}")
    return 0


cmd_show.configure = lambda p: p.add_argument("run", help="run directory")


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="python -m vlmlens", description="Look inside a vision-language model's layers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        fn.configure(p)
        p.set_defaults(func=fn)
    return parser


def _load_plugins() -> None:
    """Commands defined next to the code they drive (experiments register theirs on import)."""
    import importlib

    for mod in ("vlmlens.experiments.cli", "vlmlens.experiments.cli_pruning", "vlmlens.experiments.cli_recovery",
                "vlmlens.cached"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv=None) -> int:
    import warnings

    # transformers' deprecation notices about its own internals are not the user's business here
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (InputError, RunFormatError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

