"""Write the shipped example dataset: shapes-world rows as a JSONL manifest with PNGs (exact answers).

    python scripts/make_example_dataset.py --out assets/datasets/shapes-mini

120 single-answer questions (task ``vqa``), 40 captions (``caption``) and 40 reasoning traces
(``cot``, the reference is the final answer), from the shapes world's test split past the seeds the
suite studies use (offset 50,000), so the manifest and ``--suite shapes`` do not overlap.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmlens.tiny.tasks import split_examples  # noqa: E402

COUNTS = {"single": ("vqa", 120), "caption": ("caption", 40), "reasoning": ("cot", 40)}
OFFSET = 50_000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/datasets/shapes-mini")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for family, (task, n) in COUNTS.items():
        for e in split_examples(family, n, OFFSET):
            name = f"images/{family}-{e.seed}.png"
            e.scene.image.save(out / name, optimize=True)
            answer = e.answer.split("answer:")[-1].strip() if task == "cot" else e.answer
            rows.append({"id": f"{family}-{e.seed}", "image": name, "question": e.prompt, "answer": answer,
                         "task": task, "kind": e.kind})
    with open(out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} rows to {out}/manifest.jsonl")


if __name__ == "__main__":
    main()
