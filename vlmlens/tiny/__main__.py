"""CLI: ``python -m vlmlens.tiny train --out DIR`` / ``python -m vlmlens.tiny eval --model DIR``."""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmlens.tiny", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train the tiny shapes VLM from scratch")
    t.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on some CPUs)")
    t.add_argument("--family-weights", default=None, help="per-turn mix, e.g. 0.5,0.15,0.35 (single,caption,reasoning)")
    t.add_argument("--turns", type=int, default=None, help="questions per training conversation (default 4)")
    t.add_argument("--warmup", type=int, default=None)

    e = sub.add_parser("eval", help="score a checkpoint on the test split")
    e.add_argument("--model", required=True, help="checkpoint folder")
    e.add_argument("--n", type=int, default=300, help="test examples per family")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--no-blind", action="store_true", help="skip the blank/shuffled image check")
    e.add_argument("--json", default=None, help="also write the scores to this file")

    s = sub.add_parser("examples", help="write example scenes + prompts.json")
    s.add_argument("--out", required=True)

    args = ap.parse_args(argv)
    # On a shared CPU, spinning OpenMP workers stall each other (measured: 5-20x slower
    # steps); passive waiting keeps 2 threads efficient.  libgomp reads the variable when
    # torch is first imported (already done by `import vlmlens`), so re-exec once with it set.
    if args.cmd in ("train", "eval") and "OMP_WAIT_POLICY" not in os.environ and argv is None:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        os.execve(sys.executable, [sys.executable, "-m", "vlmlens.tiny", *sys.argv[1:]], env)
    if args.cmd == "train":
        from .train import TrainConfig, train

        cfg = TrainConfig(seed=args.seed, threads=args.threads, bf16=args.bf16)
        if args.steps is not None:
            cfg.steps = args.steps
        if args.batch_size is not None:
            cfg.batch_size = args.batch_size
        if args.lr is not None:
            cfg.lr = args.lr
        if args.warmup is not None:
            cfg.warmup = args.warmup
        if args.turns is not None:
            cfg.turns = args.turns
        if args.family_weights:
            try:
                w = tuple(float(x) for x in args.family_weights.split(","))
            except ValueError:
                w = ()
            if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
                ap.error(f"--family-weights takes 3 non-negative numbers (single,caption,reasoning), "
                         f"got {args.family_weights!r}")
            cfg.family_weights = w
        if cfg.turns < 1 or cfg.steps < 1:
            ap.error("--turns and --steps must be at least 1")
        res = train(args.out, cfg)
        print(f"done in {res['wall_time_s'] / 60:.1f} min -> {args.out}")
        return 0
    if args.cmd == "eval":
        from .eval import evaluate, format_report

        scores = evaluate(args.model, n=args.n, batch_size=args.batch_size, threads=args.threads,
                          blind=not args.no_blind)
        print(format_report(scores))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(scores, f, indent=2)
        return 0
    if args.cmd == "examples":
        from .eval import write_examples

        write_examples(args.out)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
