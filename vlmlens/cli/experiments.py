"""Experiment commands: ``truncate``, ``stages``, ``sweep``, ``study`` (``prune`` and ``encoder`` are in pruning.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import InputError
from .common import (add_input_args, add_mode_arg, add_model_args, check_inputs, check_out_dir, check_tau, command,
                     distributed, load_from_args, progress_bar, write_html)


# ---- truncate -----------------------------------------------------------------------------------

def format_side_by_side(result) -> str:
    """depth | KL | answer kept | text, with the first divergent token onward in [[ ]]."""
    lines = [f"baseline ({result.n_layers} layers, mode {result.mode}): {result.baseline_text!r}", "",
             f"{'depth':>7}  {'output KL':>9}  {'kept':>4}  text"]
    for d in result.depths:
        label = f"{d.depth}" + (" (all)" if d.depth == result.n_layers else "")
        lines.append(f"{label:>7}  {d.output_kl:9.4g}  {'yes' if d.answer_kept else 'no':>4}  {result.marked_text(d.depth)}")
    return "\n".join(lines)


@command("truncate", "generate with the image cut off at several depths, side by side with the baseline")
def cmd_truncate(args) -> int:
    from ..experiments.compare import compare
    from ..experiments.engine import check_depth_syntax, check_mode

    check_mode(args.mode)
    check_depth_syntax(args.depths)
    check_inputs(args)
    lm = load_from_args(args)
    res = compare(lm, args.visual, args.prompt, args.depths, mode=args.mode, max_new_tokens=args.max_new_tokens,
                  store="none", record_attention=False, keep_runs=False)
    print(format_side_by_side(res))
    return 0


def _configure_truncate(p):
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--depths", default="0,all", help="comma-separated depths in 0..L, 'all' = L (no truncation)")
    add_mode_arg(p)


cmd_truncate.configure = _configure_truncate


# ---- stages -------------------------------------------------------------------------------------

@command("stages", "VisiPruner's three stages from knockout windows (single layers, prefixes, suffixes)")
def cmd_stages(args) -> int:
    from ..experiments.stages import causal_stages

    check_inputs(args)
    check_tau(args.tau)
    lm = load_from_args(args)
    r = causal_stages(lm, args.visual, args.prompt, max_new_tokens=args.max_new_tokens, tau=args.tau,
                      progress=progress_bar())
    print(f"output: {r.baseline_text!r}")
    print(f"{'knocked out':>22}  {'KL (nats)':>10}  {'kept':>4}")
    L = r.n_layers
    rows = ([(f"layer {w.first}", w) for w in r.single] + [(f"0-{w.last}", w) for w in r.prefix]
            + [(f"{w.first}-{L - 1}", w) for w in r.suffix] + ([("sink + discard", r.joint)] if r.joint else []))
    for label, w in rows:
        print(f"{label:>22}  {w.answer_kl:10.4g}  {'yes' if w.kept else 'no':>4}")
    print(f"\nstages: {r.statement}")
    return 0


def _configure_stages(p):
    add_model_args(p)
    add_input_args(p)
    p.add_argument("--tau", type=float, default=0.1, help="KL over the output (nats) within which a window keeps it")


cmd_stages.configure = _configure_stages


# ---- sweep --------------------------------------------------------------------------------------

@command("sweep", "truncation sweep over every depth 0..L: summary (JSON + CSV), cliff layer, and the runs")
def cmd_sweep(args) -> int:
    from ..experiments.cliff import cliff_layer, reasoning_perturbation
    from ..experiments.compare import sweep
    from ..experiments.engine import check_mode
    from ..run_files import save_run

    check_mode(args.mode)
    check_tau(args.tau)
    out = check_out_dir(args.out, "sweep.json")
    check_inputs(args)
    lm = load_from_args(args)
    res = sweep(lm, args.visual, args.prompt, mode=args.mode, max_new_tokens=args.max_new_tokens, store=args.store,
                progress=progress_bar())
    cliff = cliff_layer(res, args.tau)
    doc = {"sweep": res.to_json(), "cliff": cliff.to_json(), "reasoning": reasoning_perturbation(res).to_json()}
    out.mkdir(parents=True, exist_ok=True)
    save_run(res.baseline_run, out / "runs" / "baseline")
    for k, run in res.runs.items():
        save_run(run, out / "runs" / f"depth_{k:02d}")
    (out / "sweep.csv").write_text(res.csv())
    (out / "sweep.json").write_text(json.dumps(doc, indent=1))
    print(format_side_by_side(res))
    from ..findings import sweep_cliff_finding, vtw_finding

    print(f"\nsweep cliff: {sweep_cliff_finding(res.to_json()).text}")
    print(f"VTW depth: {vtw_finding(res.to_json()).text}")
    att = "" if cliff.attention_cliff is None else f"; attention cliff {cliff.attention_cliff} (agree: {cliff.agree})"
    print(f"cliff layer with first-token KL < {cliff.tau} nats as well: {cliff.cliff}{att}")
    print(f"saved: {out}/sweep.json, sweep.csv, runs/")
    return 0


def _configure_sweep(p):
    from ..vocabulary import DEFAULT_TAU

    add_model_args(p)
    add_input_args(p)
    p.add_argument("--out", required=True, help="output directory (new, or an earlier sweep output)")
    add_mode_arg(p)
    p.add_argument("--tau", type=float, default=DEFAULT_TAU, help="first-token KL threshold of the cliff rule (nats)")
    p.add_argument("--store", default="all", choices=["all", "image_text", "none"], help="hidden states kept in the runs")


cmd_sweep.configure = _configure_sweep


# ---- study --------------------------------------------------------------------------------------

@command("study", "accuracy vs truncation depth: on your dataset (--data; torchrun for several processes) or the shapes suite")
def cmd_study(args) -> int:
    from ..experiments.engine import check_depth_syntax, check_mode
    from ..experiments.study import SUITES, task_study

    if args.data:
        return _dataset_study(args)
    check_mode(args.mode)
    if args.suite not in SUITES:
        raise InputError(f"unknown suite {args.suite!r}; expected one of {', '.join(SUITES)}")
    if args.n < 1:
        raise InputError(f"--n must be a positive number of examples per family, got {args.n}")
    families = [f.strip() for f in args.families.split(",")] if args.families else None
    if args.depths:
        check_depth_syntax(args.depths)
    out = check_out_dir(args.out, "study.json") if args.out else None
    lm = load_from_args(args)
    res = task_study(lm, suite=args.suite, n=args.n, families=families, mode=args.mode, depths=args.depths,
                     progress=progress_bar())
    print(f"{res.model}: {res.n_per_family} examples per family, mode {res.mode}, {res.seconds:.0f} s\n")
    for metric in ("accuracy", "token_f1", "answer_kept"):
        print(f"{metric}:\n{res.markdown(metric)}\n")
    if out is not None:
        from ..figures.experiments import fig_task_necessity

        out.mkdir(parents=True, exist_ok=True)
        (out / "study.csv").write_text(res.csv())
        (out / "study.json").write_text(json.dumps(res.to_json(), indent=1))
        write_html(fig_task_necessity(res), out / "fig_task_necessity.html")
        print(f"saved: {out}/study.json, study.csv, fig_task_necessity.html")
    return 0


def _dataset_study(args) -> int:
    from ..data import load_dataset
    from ..experiments.dataset_study import DATA_TASKS, dataset_study
    from ..experiments.engine import check_depth_syntax, check_mode
    from ..experiments.study_files import StudyLock, job_id

    check_mode(args.mode)
    if args.task is not None and args.task not in DATA_TASKS:
        raise InputError(f"unknown task {args.task!r}; expected one of {', '.join(DATA_TASKS)}")
    if not args.out:
        raise InputError("--data needs --out (the study directory: results are written there as they finish)")
    if args.depths:
        check_depth_syntax(args.depths)
    if args.methods is not None and args.depths:
        raise InputError("give --depths (a truncation study) or --methods (a pruning study), not both")
    rank, world, local, barrier = distributed()
    data = load_dataset(args.data, task=args.task, on_bad_row=args.on_bad_row)
    if rank == 0:
        print(data.summary(), file=sys.stderr)
        for b in data.skipped[:20]:
            print(f"  skipped row {b['row']}: {b['reason']}", file=sys.stderr)
    if world > 1 and args.device == "auto":
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{local}"      # one replica per GPU
    StudyLock(Path(args.out), job_id(world)).check()     # a study directory in use: refused before the model loads
    lm = load_from_args(args)
    res = dataset_study(lm, data, args.out, task=args.task, depths=args.depths, mode=args.mode,
                        max_new_tokens=args.max_new_tokens, separator=args.separator, resume=args.resume, rank=rank,
                        world=world, barrier=barrier, progress=progress_bar() if rank == 0 else None,
                        methods=args.methods, encoder_depths=args.encoder_depths, batch_size=args.batch_size,
                        vqa_normalization=args.vqa_normalization, caption_tokenizer=args.caption_tokenizer,
                        on_bad_row=args.on_bad_row)
    if res is not None:
        ex = res.execution or {}
        print(f"{res.config['model']}: {res.n_items} items, {len(res.skipped)} rows skipped, {world} process(es),"
              f" batch size {args.batch_size}, {res.seconds:.0f} s")
        for b in res.failed[:20]:
            print(f"  row {b['row']} could not run: {b['reason'][:200]}")
        for why in ex.get("reasons", []):
            print(f"  {why}")
        print()
        print(f"score (task metric):\n{res.markdown('score')}\n\nanswer kept:\n{res.markdown('answer_kept')}\n")
        if res.caption_tokenizer:
            print(f"caption tokenizer: {res.caption_tokenizer}")
        from ..figures.study import fig_dataset_study

        write_html(fig_dataset_study(res), Path(args.out) / "fig_study.html")
        print(f"saved: {args.out}/study.json, study.csv, results.jsonl, fig_study.html")
    return 0


def _configure_study(p):
    add_model_args(p)
    p.add_argument("--data", default=None, help="your dataset: a .jsonl/.csv/.parquet manifest, an image folder with "
                   "metadata.jsonl, or a folder saved with datasets' save_to_disk")
    p.add_argument("--task", default=None, help="vqa, mc, caption or cot, for rows that name no task (--data)")
    p.add_argument("--on-bad-row", default="skip", help="skip (report and leave out) or fail (--data)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out: only what is missing runs")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per item (--data)")
    p.add_argument("--batch-size", type=int, default=1, help="items per forward (--data); the same results as 1,"
                   " faster; what cannot batch runs one at a time and the study says why")
    p.add_argument("--separator", default="answer:", help="what precedes the final answer of a trace (--data)")
    p.add_argument("--vqa-normalization", default="official", choices=("official", "always"),
                   help="vqa/cot scoring (--data): official = exactly the VQA evaluation script, its skip of"
                   " normalisation when all references are one string included (comparable with published"
                   " numbers); always = normalise in every case (a cleaner variant, recorded in config.json)")
    p.add_argument("--caption-tokenizer", default="auto", choices=("auto", "ptb", "simple"),
                   help="caption scoring (--data): auto/ptb = the PTB tokenizer as the COCO evaluation (needs Java;"
                   " refused up front without it); simple = lower case, punctuation dropped (not comparable)")
    p.add_argument("--encoder-depths", default=None, help="vision-tower layers to run, e.g. 0,2,4 (--data): an"
                   " encoder x decoder grid with --depths")
    p.add_argument("--methods", default=None, help="token pruning instead of depths (--data): as for prune --methods,"
                   " e.g. fastv:2:0.5,random:2:0.5,vtw:4 or 'default'")
    p.add_argument("--suite", default="shapes", help="task suite with ground truth (shapes)")
    p.add_argument("--n", type=int, default=100, help="examples per task family")
    p.add_argument("--families", default=None, help="comma-separated subset of single,caption,reasoning")
    p.add_argument("--depths", default=None, help="comma-separated depths (default: every depth 0..L)")
    add_mode_arg(p)
    p.add_argument("--out", default=None, help="directory for study.csv, study.json (+ fig_task_necessity.html,"
                   " or results.jsonl with --data)")


cmd_study.configure = _configure_study
