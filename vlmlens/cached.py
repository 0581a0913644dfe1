"""``python -m vlmlens make-cached-runs``: (re)build the runs shipped in ``cached_runs/``.

Each run is one example scene of ``assets/examples`` with one of its prompts (one-word
answers, captions and reasoning traces) -- or, for smol-shapes, also a real photo -- captured
with every hidden state (float16), saved with :func:`vlmlens.save_run`, plus its truncation
sweep in ``<run>/sweep.json`` (``TruncationResult.to_json()``). Each built-in model has its own
list of runs (``SPECS_BY_MODEL``; any other model gets tiny-shapes' list); one folder holds the
runs of several models and ``cached_runs/index.json`` lists them all, each with its model and
ground truth. Regenerate them whenever the run format changes; the dashboard opens them without
a model (``python app.py --no-model``).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .errors import InputError
from .experiments.explore import add_analysis_arrays
from .models.loading import EXAMPLES

MAX_NEW = {"single": 4, "caption": 40, "reasoning": 48, "photo": 16}

#: (run name, example file, task family, question kind or None for the family's first prompt)
SPECS = (
    ("single-color", "shapes_00.png", "single", "color"),
    ("single-count", "shapes_03.png", "single", "count"),
    ("single-exist", "shapes_05.png", "single", "exist"),
    ("caption-two-objects", "shapes_01.png", "caption", None),
    ("caption-four-objects", "shapes_03.png", "caption", None),
    ("reasoning-more", "shapes_02.png", "reasoning", "more"),
    ("reasoning-count-color", "shapes_06.png", "reasoning", "count_color"),
    ("reasoning-left-of", "shapes_03.png", "reasoning", "left_of"),
    # the model's known weak spot (reading the row of a named object); it answers this one
    # wrongly, which is worth seeing layer by layer
    ("reasoning-above-mistake", "shapes_06.png", "reasoning", "above"),
)
#: smol-shapes (real LM and tower): three shapes tasks and two real photos, "photo:NAME" (one it
#: was trained on, one held out); a photo's truth is the encoder's own ImageNet top-1 class, the
#: target it was trained to say (a proxy for "what is in the photo")
SMOL_SPECS = (
    ("smol-single-color", "shapes_00.png", "single", "color"),
    ("smol-caption-two-objects", "shapes_01.png", "caption", None),
    ("smol-reasoning-more", "shapes_02.png", "reasoning", "more"),
    ("smol-photo-coffee", "photo:coffee", "photo", None),
    ("smol-photo-baboon-held-out", "photo:baboon.jpg", "photo", None),
)
SPECS_BY_MODEL = {"tiny-shapes": SPECS, "smol-shapes": SMOL_SPECS}


def specs_for(model: str) -> tuple:
    return SPECS_BY_MODEL.get(model, SPECS)


def all_run_names() -> set[str]:
    return {s[0] for specs in SPECS_BY_MODEL.values() for s in specs}


def photo(name: str):
    """A real photo by name (training or held-out list of smol-shapes), or InputError."""
    from .real.train import HELD_OUT_PHOTOS, TRAIN_PHOTOS, TRAIN_PHOTOS_OPENCV, load_photo

    img = load_photo(name) if name in TRAIN_PHOTOS + TRAIN_PHOTOS_OPENCV + HELD_OUT_PHOTOS else None
    if img is not None:
        return img
    raise InputError(f"photo {name!r} is not available here (scikit-image's data, or Debian's opencv-doc for the"
                     " held-out ones: bash scripts/install.sh --smol)")


def photo_spec(name: str, source: str, lm=None) -> dict:
    from .real.train import PHOTO_PROMPT, classify, imagenet_names

    img, names = photo(source), imagenet_names()
    truth = None
    if lm is not None and names is not None:
        truth = f"a photo of a {names[int(classify(lm.model, lm.processor, [img])[0])]}"
    return {"name": name, "image": img, "image_name": source, "family": "photo", "kind": "naming",
            "prompt": PHOTO_PROMPT, "answer": truth, "seed": None, "truth": "the encoder's ImageNet top-1",
            "max_new_tokens": MAX_NEW["photo"]}


def load_specs(examples_dir: Path = EXAMPLES, specs=SPECS, lm=None) -> list[dict]:
    """Resolve ``specs`` against ``prompts.json``: image path, prompt, ground-truth answer (a
    photo's truth needs ``lm``'s tower)."""
    doc_path = Path(examples_dir) / "prompts.json"
    if not doc_path.is_file():
        raise InputError(f"{doc_path} is missing; write the examples with `python -m vlmlens.tiny examples --out {examples_dir}`")
    by_file = {e["file"]: e for e in json.loads(doc_path.read_text())["examples"]}
    out = []
    for name, fname, family, kind in specs:
        if fname.startswith("photo:"):
            out.append(photo_spec(name, fname.split(":", 1)[1], lm))
            continue
        ex = by_file.get(fname)
        if ex is None:
            raise InputError(f"example {fname} is not listed in {doc_path}")
        items = ex["prompts"].get(family) or []
        pick = next((p for p in items if kind is None or p["kind"] == kind), items[0] if items else None)
        if pick is None:
            raise InputError(f"example {fname} has no {family} prompt")
        out.append({"name": name, "image": str(Path(examples_dir) / fname), "image_name": fname, "family": family,
                    "kind": pick["kind"],
                    "prompt": pick["prompt"], "answer": pick["answer"], "seed": ex.get("seed"),
                    "truth": ex.get("truth"), "max_new_tokens": MAX_NEW[family]})
    return out


def experiment_extras(lm, image, prompt: str, max_new_tokens: int, *, measure: bool = False) -> dict:
    """Knockout stages, substitution matrix, layer-skip scan and compute trade-off of one input
    (JSON-able), stored as ``extras.json`` next to a run. Latency is only timed with
    ``measure`` (timings from a shared machine would ship as noise)."""
    from .analysis.compute import compute_tradeoff
    from .experiments.skip import layer_skip_scan
    from .experiments.stages import causal_stages
    from .experiments.substitution import substitution_matrix

    L = lm.n_layers
    results = {
        "stages": causal_stages(lm, image, prompt, max_new_tokens=max_new_tokens),
        "substitution": substitution_matrix(lm, image, prompt, stride=max(1, L // 4), max_new_tokens=max_new_tokens),
        "layer_skip": layer_skip_scan(lm, image, prompt, max_new_tokens=max_new_tokens),
        "compute": compute_tradeoff(lm, image, prompt, measure=measure, repeats=2),
    }
    return {k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in results.items()}


def make_cached_runs(lm, out_dir: str | Path, *, sweep: bool = True, extras: bool = True,
                     measure_latency: bool = False, only: list[str] | None = None, log=print) -> list[dict]:
    """Capture every spec with ``lm`` into ``out_dir`` (each run replaced atomically)."""
    from .capture import capture
    from .experiments.compare import sweep as run_sweep
    from .run_files import save_run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    specs = specs_for(lm.name)
    for spec in load_specs(specs=specs, lm=lm):
        if only and spec["name"] not in only:
            continue
        t0 = time.perf_counter()
        run = capture(lm, spec["image"], spec["prompt"], max_new_tokens=spec["max_new_tokens"], store="all",
                      hidden_dtype="float16", record_vision=True)      # the Encoder and decoder panel needs them
        run.meta["label"] = spec["name"]
        run.meta["task"] = {k: spec[k] for k in ("family", "kind", "answer", "seed")}
        added = add_analysis_arrays(lm, run)
        dest = save_run(run, out / spec["name"])
        if sweep:
            res = run_sweep(lm, spec["image"], spec["prompt"], mode="drop", max_new_tokens=spec["max_new_tokens"],
                            store="none", record_attention=False, keep_runs=False, truth=spec["answer"])
            (dest / "sweep.json").write_text(json.dumps(res.to_json(), indent=1, allow_nan=True))
        if extras:
            ex = experiment_extras(lm, spec["image"], spec["prompt"], spec["max_new_tokens"], measure=measure_latency)
            (dest / "extras.json").write_text(json.dumps(ex, indent=1, allow_nan=True))
            added += sorted(ex)
        size = sum(f.stat().st_size for f in dest.iterdir())
        log(f"{spec['name']:24s} {run.generated_text!r:48s} truth {spec['answer']!r}  "
            f"{size / 1e6:.2f} MB  {time.perf_counter() - t0:.1f} s{'  +' + ','.join(added) if added else ''}")
        index.append({"name": spec["name"], "prompt": spec["prompt"], "family": spec["family"], "kind": spec["kind"],
                      "truth": spec["answer"], "generated": run.generated_text, "model": lm.name,
                      "image": spec["image_name"], "bytes": size,
                      **({"truth_is": spec["truth"]} if spec["family"] == "photo" else {})})
    mine = {s[0] for s in specs}
    if not only:
        known = all_run_names() | mine
        for p in out.iterdir():  # runs of an older spec list
            if p.is_dir() and (p / "run.json").is_file() and p.name not in known:
                shutil.rmtree(p)
    if (out / "index.json").is_file():  # keep the entries of the runs not rebuilt (other models' too)
        old = json.loads((out / "index.json").read_text()).get("runs", [])
        names = {r["name"] for r in index}
        keep = [r for r in old if r["name"] not in names and (only or r["name"] not in mine)
                and (out / r["name"] / "run.json").is_file()]
        index = keep + index
    order = [s[0] for m in SPECS_BY_MODEL.values() for s in m]
    index.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    (out / "index.json").write_text(json.dumps({"models": sorted({r["model"] for r in index}), "runs": index}, indent=1))
    (out / "README.md").write_text(readme(index))
    return index


def readme(index: list[dict]) -> str:
    """cached_runs/README.md: what the runs are and how to rebuild them."""
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    models = sorted({r["model"] for r in index})
    lines = [
        "# Cached runs", "",
        f"Example runs of {', '.join(f'`{m}`' for m in models)} on the scenes of `assets/examples/` (and, for",
        "smol-shapes, real photos: a photo's ground truth is the encoder's own ImageNet top-1 class, the answer it was",
        "trained to give -- a proxy), opened by the dashboard without a model",
        "(`python app.py --no-model`). Each folder is a run (`run.json`, `arrays.safetensors`, `image.png`; hidden",
        "states float16, LLaVA-CAM and logit lens included) plus `sweep.json` (the truncation sweep, mode drop, with",
        "answer-level KL and correct / wrong against the truth per depth) and `extras.json` (the knockout windows behind",
        "the three stages, substitution matrix, layer-skip scan, FLOP / KV-cache savings per depth).", "",
        "Rebuild them (e.g. after a run-format change), one model at a time, with:", "",
        "```bash", *(f"python -m vlmlens make-cached-runs --model {m}" for m in models), "```", "",
        "| run | model | task | prompt | ground truth | generated | size |", "|---|---|---|---|---|---|---|",
    ]
    for r in index:
        lines.append(f"| {r['name']} | {r['model']} | {r['family']} / {r['kind']} | {cell(r['prompt'])} | "
                     f"{cell(r['truth'])} | {cell(r['generated'])} | {r['bytes'] / 1e3:.0f} kB |")
    total = sum(r["bytes"] for r in index)
    lines += ["", f"Total: {len(index)} runs, {total / 1e6:.2f} MB.", ""]
    return "\n".join(lines)
