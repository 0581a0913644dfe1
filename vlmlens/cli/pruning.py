"""Commands of token pruning and of encoder depth: ``prune``, ``encoder``."""
from __future__ import annotations

import json

from ..errors import InputError
from .common import (add_input_args, add_mode_arg, add_model_args, check_inputs, check_out_dir, command, load_from_args,
                     progress_bar, write_html)


# ---- prune --------------------------------------------------------------------------------------

@command("prune", "token pruning compared (FastV, PyramidDrop, VTW, baselines, stages): one image, or the shapes suite")
def cmd_prune(args) -> int:
    from ..experiments.methods import METHOD_SYNTAX
    from ..experiments.pruning import calibrated_stages, compare_pruning, find_vtw_layer, pruning_study
    from ..experiments.variants import parse_variants

    one = bool(args.image or args.prompt)
    if one and not (args.image and args.prompt):
        raise InputError("give both --image and --prompt (one input), or neither (--suite shapes)")
    if one:
        check_inputs(args)
    if args.n < 1:
        raise InputError(f"--n must be a positive number of examples per family, got {args.n}")
    if args.latency and not one:
        raise InputError("--latency times one input (--image and --prompt), not the suite")
    if args.calibrate < 0:
        raise InputError(f"--calibrate must be 0 (off) or a number of calibration examples, got {args.calibrate}")
    if not args.methods.strip():
        raise InputError(f"--methods is empty; {METHOD_SYNTAX}")
    out = check_out_dir(args.out, "pruning.json") if args.out else None
    lm = load_from_args(args)
    methods = dict(parse_variants(lm, methods=args.methods).methods)
    if args.calibrate:
        from ..tiny.tasks import make_example, split_seeds

        # calibration on the validation split of the shapes world: never the test examples scored below
        cal = [(e.scene.image, e.prompt) for f in ("single", "caption", "reasoning")
               for e in (make_example(s, f) for s in split_seeds("val", args.calibrate))]
        vtw = find_vtw_layer(lm, cal, args.eta, max_new_tokens=8, progress=progress_bar())
        print(f"VTW calibration on {len(cal)} examples, eta {args.eta}: K = {vtw.layer} (stable from {vtw.stable_layer});"
              f" mean KL per depth {[round(x, 4) for x in vtw.mean_kl]}")
        if vtw.layer is not None:
            from ..interventions import VTW

            methods[f"VTW calibrated k={vtw.layer}"] = [VTW(vtw.layer)]
        per = min(args.calibrate, 3)       # knockout windows cost 3L+1 forwards each: a few per family
        stages, labels = calibrated_stages(lm, [c for i in range(3) for c in cal[i * args.calibrate:][:per]],
                                           max_new_tokens=8)
        print(f"causal stages (majority of {3 * per} calibration examples, {per} per family): {labels} ->"
              f" {list(stages.stages)}")
        methods["StagePruner (calibrated)"] = [stages]
    if one:
        res = compare_pruning(lm, args.visual, args.prompt, methods, max_new_tokens=args.max_new_tokens, truth=args.truth,
                              latency=args.latency, progress=progress_bar())
        print(f"{res.model}: baseline {res.baseline_text!r}; {res.n_image} image tokens, {res.n_layers} layers\n")
        print(res.markdown())
    else:
        families = [f.strip() for f in args.families.split(",")] if args.families else None
        res = pruning_study(lm, methods, n=args.n, families=families, progress=progress_bar())
        print(f"{res.model}: {res.n_per_family} examples per family, {res.seconds:.0f} s\n")
        for f in res.families:
            print(f"{f}:\n{res.markdown(f)}\n")
        from ..experiments.pruning import adaptive_vs_fixed

        for m in (m for m in res.methods if m.startswith("adaptive") and any(x.startswith("VTW k=") for x in res.methods)):
            for f, r in adaptive_vs_fixed(res, m).items():
                at = r["fixed_accuracy_at_same_saving"]
                print(f"{m} on {f}: accuracy {100 * r['adaptive_accuracy']:.0f}% at {100 * r['adaptive_saving']:.1f}% saved"
                      f" (mean depth {r['adaptive_mean_depth']:.1f}); fixed VTW depths at the same saving:"
                      f" {'–' if at is None else f'{100 * at:.0f}%'}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pruning.json").write_text(json.dumps(res.to_json(), indent=1))
        if not one:
            from ..figures.pruning import fig_pruning_pareto

            (out / "pruning.csv").write_text(res.csv())
            write_html(fig_pruning_pareto(res), out / "fig_pruning_pareto.html")
        print(f"saved: {out}/pruning.json" + ("" if one else ", pruning.csv, fig_pruning_pareto.html"))
    return 0


def _configure_prune(p):
    from ..vocabulary import METHOD_SYNTAX, VTW_ETA

    add_model_args(p)
    p.add_argument("--image", default=None, help="one image (with --prompt); without both: the shapes suite")
    p.add_argument("--prompt", default=None, help="question or instruction about the image")
    p.add_argument("--truth", default=None, help="the correct answer of the one input (optional)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--methods", default="default", help=METHOD_SYNTAX.replace("%", "%%"))   # argparse formats help with %
    p.add_argument("--latency", action="store_true", help="also measure each method's prefill and end-to-end time"
                   " (one input; the methods interleaved in one run, median of 3)")
    p.add_argument("--calibrate", type=int, default=0,
                   help="calibrate VTW's K and the causal stages on this many shapes train examples per family")
    p.add_argument("--eta", type=float, default=VTW_ETA, help="VTW's KL threshold (nats) for --calibrate")
    p.add_argument("--n", type=int, default=20, help="examples per task family (suite)")
    p.add_argument("--families", default=None, help="comma-separated subset of single,caption,reasoning")
    p.add_argument("--out", default=None, help="directory for pruning.json (+ pruning.csv, fig_pruning_pareto.html)")


cmd_prune.configure = _configure_prune


# ---- encoder x decoder depth ------------------------------------------------------------------------

@command("encoder", "encoder depth x decoder depth: which (vision layers run, decoder cut) keep the answer")
def cmd_encoder(args) -> int:
    from ..experiments.encoder import encoder_decoder_grid
    from ..experiments.engine import check_mode

    check_inputs(args)
    check_mode(args.mode)
    out = check_out_dir(args.out, "encoder_grid.json") if args.out else None
    lm = load_from_args(args)
    res = encoder_decoder_grid(lm, args.visual, args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens,
                               truth=args.truth, progress=progress_bar())
    print(f"{res.model}: baseline {res.baseline_text!r}; vision features read after {res.feature_depth} tower layers,"
          f" {res.n_layers} decoder layers, mode {res.mode}\n")
    print(res.markdown())
    if out is not None:
        from ..figures.encoder import fig_encoder_grid

        out.mkdir(parents=True, exist_ok=True)
        (out / "encoder_grid.json").write_text(json.dumps(res.to_json(), indent=1))
        write_html(fig_encoder_grid(res), out / "fig_encoder_grid.html")
        print(f"saved: {out}/encoder_grid.json, fig_encoder_grid.html")
    return 0


def _configure_encoder(p):
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--truth", default=None, help="the correct answer (optional)")
    add_mode_arg(p, "remove", "decoder-side cut")
    p.add_argument("--out", default=None, help="directory for encoder_grid.json and fig_encoder_grid.html")


cmd_encoder.configure = _configure_encoder
