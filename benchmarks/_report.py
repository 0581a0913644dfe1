"""Write one benchmark's section into BENCHMARKS.md, leaving the other sections as they are."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

BENCH_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; ratios are measured side by side in one run.\n"


def _put(text: str, key: str, block: str) -> str:
    """``text`` with the section ``key`` replaced by ``block`` (appended when it has none)."""
    pat = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
    return pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- key -->`` and ``<!-- /key -->``."""
    text = BENCH_MD.read_text() if BENCH_MD.exists() else HEADER
    machine = os.environ.get("VLMLENS_BENCH_MACHINE") or "this machine"      # gpu_7b.sh names the GPU it ran on
    block = f"<!-- {key} -->\n## {title}\n\n_{time.strftime('%Y-%m-%d')}, `benchmarks/` script, {machine}._\n\n{body}\n<!-- /{key} -->"
    BENCH_MD.write_text(_put(text, key, block))


def merge_sections(other: Path, contains: str) -> list[str]:
    """Copy into BENCHMARKS.md every section of ``other`` (a BENCHMARKS.md written elsewhere, e.g. on the device
    machine by gpu_7b.sh) whose key contains ``contains``; returns the keys copied."""
    found = re.findall(r"<!-- ([\w.-]+) -->\n(.*?)\n<!-- /\1 -->", Path(other).read_text(), re.S)
    text = BENCH_MD.read_text() if BENCH_MD.exists() else HEADER
    keys = [key for key, _ in found if contains in key]
    for key, inner in found:
        if key in keys:
            text = _put(text, key, f"<!-- {key} -->\n{inner}\n<!-- /{key} -->")
    BENCH_MD.write_text(text)
    return keys


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python benchmarks/_report.py OTHER_BENCHMARKS.md KEY_PART   (e.g. ... 7b_cuda)")
    print("copied:", ", ".join(merge_sections(Path(sys.argv[1]), sys.argv[2])) or "nothing")
