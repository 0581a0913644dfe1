"""A short load run of the dashboard on tiny-shapes: N sessions x M mixed requests, at once.

Each session (its own gradio_client) captures one example with one of its prompts, then cycles
through the cheap views a person clicks (a heatmap layer, the heatmaps tab, dynamics, the
attention tab) and opens a cached run. Reports p50 / p90 / max latency per endpoint, errors,
and the server's RSS before and after (the app runs in this process, on 127.0.0.1 only).

    python benchmarks/bench_load.py                    # 10 sessions x 20 requests
    python benchmarks/bench_load.py --sessions 4 --requests 10 --no-write
"""
from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--requests", type=int, default=20, help="requests per session (the first is a capture)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args(argv)

    import torch
    from gradio_client import Client, handle_file

    from benchmarks._report import write_section
    from vlmlens.ui import build_demo
    from vlmlens.ui.inputs import load_examples

    torch.set_num_threads(2)
    examples = [e for e in load_examples() if e.get("prompts")]
    demo = build_demo("tiny-shapes", runs_dir=ROOT / "cached_runs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    lm = demo.dashboard.holder.wait(120)
    url = f"http://127.0.0.1:{port}/"
    Client(url, verbose=False).predict(handle_file(examples[0]["file"]), "What color is the circle?", 4,
                                       api_name="/capture")   # warm-up (first call compiles / allocates)
    before = rss_mb()
    lat: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    lock = threading.Lock()

    def session(i: int) -> None:
        ex = examples[i % len(examples)]
        prompt = ex["prompts"]["single"][i % len(ex["prompts"]["single"])]["prompt"]
        c = Client(url, verbose=False)
        calls = [("/capture", (handle_file(ex["file"]), prompt, 4))]
        cycle = [("/heatmap_layer", lambda k: (k % lm.n_layers, 0, "attention")),
                 ("/heatmaps", lambda k: (k % lm.n_layers, 0, "attention")),
                 ("/dynamics", lambda k: ("image",)), ("/attention", lambda k: ()),
                 ("/load_run", lambda k: ("single-color",))]
        for k in range(args.requests - 1):
            name, fn = cycle[k % len(cycle)]
            calls.append((name, fn(k)))
        for name, a in calls:
            t0 = time.perf_counter()
            try:
                c.predict(*a, api_name=name)
            except Exception as e:  # noqa: BLE001 -- counted and reported
                with lock:
                    errors.append(f"{name}: {type(e).__name__}: {e}"[:200])
                continue
            with lock:
                lat[name].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - t0
    after = rss_mb()
    demo.close()

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]
    lines = [f"{args.sessions} sessions x {args.requests} requests at once on `{lm.name}` ({lm.device}, 2 threads), "
             f"app and clients in one process on 127.0.0.1; wall {wall:.1f} s, "
             f"{sum(map(len, lat.values()))} requests served, {len(errors)} errors; server RSS "
             f"{before:.0f} MB before, {after:.0f} MB after.", "",
             "| endpoint | n | p50 | p90 | max |", "|---|---|---|---|---|"]
    for name in sorted(lat):
        xs = lat[name]
        lines.append(f"| {name} | {len(xs)} | {statistics.median(xs) * 1000:.0f} ms | {q(xs, 0.9) * 1000:.0f} ms | "
                     f"{max(xs) * 1000:.0f} ms |")
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors[:10]]]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("ui-load", "Dashboard under load (benchmarks/bench_load.py)", body)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
