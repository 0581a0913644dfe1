"""Example images, example prompts and random scenes for the input panel (no gradio here)."""
from __future__ import annotations

import json
import random
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import InputError
from ..models.loading import EXAMPLES as EXAMPLES_DIR

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


class SceneBook:
    """The shapes-world scenes the dashboard has shown (examples, random scenes), by the sha256
    of their pixels, so that a capture of one of them knows its ground truth: the scene, and the
    answer when the prompt is one of the scene's example prompts. Bounded (oldest dropped)."""

    def __init__(self, capacity: int = 512) -> None:
        self._by_sha: OrderedDict[str, dict] = OrderedDict()
        self._cap = int(capacity)
        self._lock = threading.Lock()

    def add_image(self, image, truth: dict | None, seed, prompts: dict | None) -> str | None:
        from ..images import image_sha256, load_image

        if not truth:
            return None
        rgb, _ = load_image(image)
        sha = image_sha256(rgb)
        with self._lock:
            self._by_sha[sha] = {"truth": truth, "seed": seed, "prompts": prompts or {}}
            self._by_sha.move_to_end(sha)
            while len(self._by_sha) > self._cap:
                self._by_sha.popitem(last=False)
        return sha

    def add_file(self, path, truth: dict | None, seed, prompts: dict | None) -> str | None:
        try:
            return self.add_image(path, truth, seed, prompts)
        except (OSError, InputError):
            return None

    def get(self, sha: str | None) -> dict | None:
        with self._lock:
            return self._by_sha.get(sha) if sha else None

    def task(self, sha: str | None, prompt: str) -> dict | None:
        """``{"family", "kind", "answer", "seed"}`` when ``prompt`` is one of the scene's prompts."""
        scene = self.get(sha)
        if scene is None:
            return None
        want = " ".join(prompt.lower().split())
        for fam, items in scene["prompts"].items():
            for it in items or []:
                if " ".join(str(it.get("prompt", "")).lower().split()) == want and it.get("answer"):
                    return {"family": fam, "kind": it.get("kind"), "answer": it["answer"], "seed": scene["seed"]}
        return None

    def truth_markdown_for(self, run) -> str:
        """The left panel's ground truth for ``run``: its scene (known image, or the scene seed
        stored with the run) and the answer to its prompt; a plain "none" otherwise, so a stale
        truth of another scene never stays on screen."""
        scene = self.get(run.meta.get("image_sha256"))
        task = run.meta.get("task") or {}
        truth, seed = (scene["truth"], scene["seed"]) if scene else (None, task.get("seed"))
        if truth is None and seed is not None:
            try:
                from ..tiny.scenes import make_scene

                truth = make_scene(int(seed)).truth()
            except (ImportError, ValueError, TypeError):
                truth = None
        if truth is None:
            return "_No ground truth for this run's image (only shapes-world scenes have one)._"
        text = "**This run's scene.** " + truth_markdown(truth, seed)
        if task.get("answer"):
            text += f"  \n**Truth for its prompt:** {task['answer']}"
        return text
