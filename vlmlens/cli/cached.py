"""``make-cached-runs``: capture the example runs the dashboard opens with no model loaded."""
from __future__ import annotations

from .common import add_model_args, command, load_from_args


@command("make-cached-runs", "capture the example runs shipped in cached_runs/ (with their truncation sweeps)")
def cmd_make_cached_runs(args) -> int:
    from ..cached import make_cached_runs
    from ..models.loading import REPO_ROOT

    args.out = args.out or str(REPO_ROOT / "cached_runs")
    lm = load_from_args(args)
    index = make_cached_runs(lm, args.out, sweep=not args.no_sweep, extras=not args.no_extras,
                             measure_latency=args.measure_latency, only=args.only or None)
    total = sum(r["bytes"] for r in index)
    print(f"{len(index)} runs, {total / 1e6:.2f} MB in {args.out}")
    return 0


def _configure(p) -> None:
    add_model_args(p)
    p.add_argument("--out", default=None, help="folder to write the runs to (default: cached_runs/ of the checkout)")
    p.add_argument("--no-sweep", action="store_true", help="skip the truncation sweeps")
    p.add_argument("--no-extras", action="store_true", help="skip substitution matrix, layer-skip scan and compute")
    p.add_argument("--measure-latency", action="store_true", help="also time each depth (on a quiet machine)")
    p.add_argument("--only", nargs="*", help="names of runs to rebuild (default: all)")


cmd_make_cached_runs.configure = _configure

