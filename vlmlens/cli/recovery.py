"""The ``recover`` command (LoRA adapters trained with the image cut at each depth, then
evaluated against the untruncated and the truncated model) and ``build-model`` (a built-in
model assembled from installed parts)."""
from __future__ import annotations

import sys

from ..errors import InputError
from .common import add_model_args, check_out_dir, command, load_from_args


@command("recover", "LoRA recovery: train adapters with the image cut at depth k, compare per task family")
def cmd_recover(args) -> int:
    from ..experiments.recovery import RecoveryConfig
    from ..experiments.recovery_study import recovery_study

    cfg = RecoveryConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank, alpha=2 * args.rank,
                         seed=args.seed)
    cfg.check()
    out = check_out_dir(args.out)
    data = eval_data = None
    if args.data or args.eval_data:
        if not (args.data and args.eval_data):
            raise InputError("--data (training rows) needs --eval-data (held-out rows), and the other way round")
        from ..data import load_dataset

        data, eval_data = load_dataset(args.data, task=args.task), load_dataset(args.eval_data, task=args.task)
    lm = load_from_args(args)
    res = recovery_study(lm, args.depths, out, cfg=cfg, n_train=args.n_train, n_eval=args.n_eval, data=data,
                         eval_data=eval_data, log=lambda s: print(s, file=sys.stderr))
    print(f"{res.model}: {res.metric} per task family, adapters trained for {cfg.steps} steps per depth\n")
    print(res.markdown())
    print(f"\nsaved: {out}/recovery.json, recovery.csv, " + ", ".join(f"k{k}/ (adapter)" for k in res.depths))
    return 0


def _configure_recover(p):
    add_model_args(p)
    p.add_argument("--depths", default="2,4,6", help="decoder depths k to cut the image at and recover, e.g. 2,4,6")
    p.add_argument("--steps", type=int, default=300, help="training steps per depth")
    p.add_argument("--batch-size", type=int, default=16, help="training items per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000, help="shapes-world training items (without --data)")
    p.add_argument("--n-eval", type=int, default=50, help="shapes test items per task family (without --eval-data)")
    p.add_argument("--data", default=None, help="your training rows (a dataset with answers; see `study --data`)")
    p.add_argument("--eval-data", default=None, help="your held-out rows to evaluate with")
    p.add_argument("--task", default=None, help="vqa, mc, caption or cot, for rows that name no task")
    p.add_argument("--out", required=True, help="new directory: k{K}/ adapters, recovery.json, recovery.csv")


cmd_recover.configure = _configure_recover


@command("build-model", "assemble a built-in model from installed parts: smol-shapes (SmolLM2 + EfficientNet-Lite0)")
def cmd_build_model(args) -> int:
    if args.name != "smol-shapes":
        raise InputError(f"unknown model to build {args.name!r}; buildable: smol-shapes")
    from ..real.build import BUILD_DIR, build

    build(args.out or BUILD_DIR, log=lambda s: print(s, file=sys.stderr))
    return 0


def _configure_build(p):
    p.add_argument("name", help="smol-shapes")
    p.add_argument("--out", default=None, help="where to write it (default: assets/smol-shapes/model, git-ignored)")


cmd_build_model.configure = _configure_build
