"""What the memory benchmarks share: each variant runs in a fresh subprocess of the same script (so
that one variant's peak memory is its own), with the same arguments."""
from __future__ import annotations

import json
import subprocess
import sys


def add_child_args(ap, presets, new_tokens: int) -> None:
    """The arguments every such benchmark takes (plus its own size list)."""
    ap.add_argument("--preset", default="mid", choices=sorted(presets))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant before it counts as failed")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", nargs=2, help="(internal) run one variant: SIZE NAME")


def run_child(script: str, a, size: str, name: str) -> dict:
    """Run variant ``name`` at ``size`` in a fresh process of ``script``; its JSON line, or {"error": why}."""
    cmd = [sys.executable, script, "--preset", a.preset, "--device", a.device, "--dtype", a.dtype,
           "--new-tokens", str(a.new_tokens), "--threads", str(a.threads), "--child", size, name]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {a.timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": "killed (out of memory?)" if out.returncode < 0 else out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])
