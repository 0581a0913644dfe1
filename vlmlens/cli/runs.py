"""Commands on one run: ``capture`` (capture and save it) and ``show`` (its summary and headlines)."""
from __future__ import annotations

from .common import RUN_MARKER, add_input_args, add_model_args, check_inputs, check_out_dir, command, load_from_args


@command("capture", "capture one run (hidden states, attention to the image) and save it")
def cmd_capture(args) -> int:
    from ..capture import capture
    from ..run_files import save_run

    if args.out:
        check_out_dir(args.out, RUN_MARKER)
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
    from ..findings import findings
    from ..run_files import load_run, read_extras

    run = load_run(args.run)
    print(run.summary())
    extras = read_extras(args.run)
    print("headlines (causal: read off an intervention; measured; proxy; not found; unverified: run the experiment):")
    for f in findings(run, extras=extras):          # every mode's sweep is in extras["sweeps"]
        print(f"  {f.title} [{f.status}]: {f.text}")
    return 0


cmd_show.configure = lambda p: p.add_argument("run", help="run directory")
