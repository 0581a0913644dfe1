"""Write one benchmark's section into BENCHMARKS.md, leaving the other sections as they are."""
from __future__ import annotations

import re
import time
from pathlib import Path

BENCH_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; ratios are measured side by side in one run.\n"


def write_section(key: str, title: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- key -->`` and ``<!-- /key -->``."""
    text = BENCH_MD.read_text() if BENCH_MD.exists() else HEADER
    block = f"<!-- {key} -->\n## {title}\n\n_{time.strftime('%Y-%m-%d')}, `benchmarks/` script, this machine._\n\n{body}\n<!-- /{key} -->"
    pat = re.compile(rf"<!-- {re.escape(key)} -->.*?<!-- /{re.escape(key)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
