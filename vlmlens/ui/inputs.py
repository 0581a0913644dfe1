"""Example images, example prompts and random scenes for the input panel (no gradio here)."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "assets" / "examples"
FAMILY_TITLES = {"single": "one word", "caption": "caption", "reasoning": "reasoning"}
GENERIC_PROMPTS = {
    "single": ["What color is the circle?", "How many objects are there?", "Is there a red square?"],
    "caption": ["Describe the image."],
    "reasoning": ["Is the blue square left of the red circle?"],
}
TEST_SEEDS = (0, 100_000)  # the tiny world's test split: scenes never seen in training


def load_examples(folder: Path = EXAMPLES_DIR) -> list[dict]:
    """Entries of ``prompts.json`` whose PNG exists: file (absolute path), seed, truth, prompts."""
    doc_path = Path(folder) / "prompts.json"
    out = []
    if doc_path.is_file():
        try:
            doc = json.loads(doc_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = {}
        for e in doc.get("examples", []) if isinstance(doc, dict) else []:
            p = Path(folder) / str(e.get("file", ""))
            if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                out.append({**e, "file": str(p)})
    else:  # a folder of images without prompts
        for p in sorted(Path(folder).glob("*.png")) if Path(folder).is_dir() else []:
            out.append({"file": str(p), "prompts": {}})
    return out


def prompt_choices(prompts: dict | None) -> list[tuple[str, str]]:
    """Dropdown choices (label, prompt) grouped by task family; answers shown as ground truth."""
    prompts = prompts or {}
    out = []
    for fam in ("single", "caption", "reasoning"):
        items = prompts.get(fam) or [{"prompt": p} for p in GENERIC_PROMPTS[fam]]
        for it in items:
            label = f"[{FAMILY_TITLES[fam]}] {it['prompt']}"
            if it.get("answer"):
                label += f"  → {it['answer']}"
            out.append((label, it["prompt"]))
    return out


def truth_markdown(truth: dict | None, seed: int | None = None) -> str:
    if not truth:
        return ""
    objs = truth.get("objects", [])
    head = f"**Ground truth** (scene seed {seed if seed is not None else truth.get('seed')}): "
    if not objs:
        return head + "no objects."
    items = [f"{o['size']} {o['color']} {o['shape']} at {o['position']}" for o in objs]
    return head + f"{len(objs)} object{'s' if len(objs) > 1 else ''}: " + "; ".join(items) + "."


def random_scene(seed: int | None = None):
    """(PIL image, truth dict, prompts by family) of a fresh test-split scene."""
    try:
        from ..tiny.eval import example_prompts
        from ..tiny.scenes import make_scene
    except ImportError as e:  # pragma: no cover - the tiny world ships with vlmlens
        raise InputError(f"the tiny shapes world is not available in this build ({e})") from None
    if seed is None:
        seed = random.randrange(*TEST_SEEDS)
    scene = make_scene(int(seed))
    return scene.image, scene.truth(), example_prompts(int(seed))
