"""Train smol-shapes' projector: EfficientNet-Lite0 features -> SmolLM2's embedding space.

Both networks stay frozen; only the projector (1280 -> 576 -> 576, GELU) learns, with the
gradient going back through the whole language model. Items: the shapes world's conversations
(single-word answers, captions, reasoning traces: the tiny-shapes tasks, train split) and real
photos with augmentation (random crops, flips, colour jitter) whose targets come from the
encoder's own ImageNet head ("a photo of a tiger cat"): the classifier distilled into words.

The encoder's features are computed once per item before training (the tower is frozen), so a
step costs one LM forward + backward. ``python -m vlmlens.real.train --steps N`` writes
``assets/smol-shapes/projector.safetensors`` (or ``out``) and ``train_log.json`` next to it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .build import IMAGE_TOKEN, PROJECTOR, assemble

PHOTO_PROMPT = "What is in this photo?"


def imagenet_names() -> list[str] | None:
    """The 1000 ImageNet-1k class names (Debian's opencv-doc ships the list), or None."""
    p = Path("/usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt")
    if not p.is_file():
        return None
    names = [l.split(",")[0].strip() for l in p.read_text().splitlines() if l.strip()]
    return names if len(names) == 1000 else None


OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
#: training photos (scikit-image's bundled data) and held-out photos never trained on (Debian's
#: opencv-doc examples, when installed)
TRAIN_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle")
HELD_OUT_PHOTOS = ("baboon.jpg", "fruits.jpg", "butterfly.jpg", "apple.jpg", "orange.jpg", "messi5.jpg")


def photo_sources(held_out: bool = False) -> list:
    """Real photos: (name, PIL image). ``held_out``: the ones never trained on."""
    from PIL import Image

    out = []
    if held_out:
        for name in HELD_OUT_PHOTOS:
            if (OPENCV_DATA / name).is_file():
                out.append((name, Image.open(OPENCV_DATA / name).convert("RGB")))
        return out
    from skimage import data

    for name in TRAIN_PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:             # some skimage images need a download: offline they are absent
            continue
        if isinstance(img, tuple):
            img = img[0]
        out.append((name, Image.fromarray(np.asarray(img)).convert("RGB")))
    return out


def augment(img, rng):
    """A random crop (40-100 % of the short side), maybe a flip, a mild colour jitter."""
    from PIL import ImageEnhance, ImageOps

    w, h = img.size
    s = int(min(w, h) * rng.uniform(0.4, 1.0))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    out = img.crop((x, y, x + s, y + s))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))


def make_items(n_shapes: int, n_photos: int, model, proc, seed: int = 0, weights=(0.6, 0.15, 0.25)):
    """(image, prompt, answer, kind) items: shapes-world train split + augmented photos labelled
    by the encoder's own classifier (kind "photo")."""
    from ..tiny.tasks import FAMILIES, SPLITS, make_example

    rng = np.random.default_rng(seed)
    w = np.asarray(weights) / np.sum(weights)
    items = []
    for i in range(n_shapes):
        ex = make_example(SPLITS["train"][0] + 5_000_000 + i, FAMILIES[int(rng.choice(3, p=w))])
        items.append((ex.scene.image, ex.prompt, ex.answer, ex.family))
    names, photos = imagenet_names(), photo_sources()
    if names and photos and n_photos:
        for i in range(n_photos):
            img = augment(photos[i % len(photos)][1], rng)
            label = names[int(classify(model, proc, [img])[0])]
            items.append((img, PHOTO_PROMPT, f"a photo of a {label}", "photo"))
    return items


@torch.no_grad()
def classify(model, proc, images) -> np.ndarray:
    pv = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return model.model.vision_tower.classify(pv).argmax(-1).numpy()


@torch.no_grad()
def features(model, proc, images, batch: int = 32) -> torch.Tensor:
    """[N, 49, 1280] tower features (the projector's input) of ``images``."""
    out = []
    for i in range(0, len(images), batch):
        pv = proc.image_processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"]
        out.append(model.model.vision_tower(pv).last_hidden_state)
    return torch.cat(out)


def encode(proc, prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids of the chat prompt + answer + end of turn, index of the first answer token);
    the image placeholder is expanded to the 49 image tokens the processor would insert."""
    tok = proc.tokenizer
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                    add_generation_prompt=True)
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * 49)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ans = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return ids + ans, len(ids)


def step_loss(model, feats, seqs, image_id: int, pad_id: int) -> torch.Tensor:
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    tgt = torch.full((len(seqs), L), -100, dtype=torch.long)
    for b, (s, a) in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s)
        mask[b, :len(s)] = 1
        tgt[b, a - 1:len(s) - 1] = torch.as_tensor(s[a:])
    emb = model.model.language_model.embed_tokens(ids)
    img = model.model.multi_modal_projector(feats)                       # [B, 49, d]
    emb = emb.masked_scatter((ids == image_id)[..., None], img.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


def train(steps: int = 300, batch: int = 8, lr: float = 1e-3, n_shapes: int = 3000, n_photos: int = 300,
          seed: int = 0, out: Path = PROJECTOR, log=print, time_budget: float | None = None,
          resume: bool = False) -> dict:
    """Train the projector (``resume``: from the shipped one; else from a fresh initialisation)."""
    torch.manual_seed(seed)
    model, proc, found = assemble(log)
    model = model.float().eval()
    if found["projector"] and not resume:
        for m in model.model.multi_modal_projector.modules():
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    items = make_items(n_shapes, n_photos, model, proc, seed)
    feats = features(model, proc, [it[0] for it in items])
    seqs = [encode(proc, it[1], it[2]) for it in items]
    log(f"{len(items)} items, features {tuple(feats.shape)} in {time.perf_counter() - t0:.0f} s")
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    curve, t1 = [], time.perf_counter()
    done = 0
    for step in range(steps):
        if time_budget is not None and time.perf_counter() - t1 > time_budget:
            break
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        pick = rng.choice(len(items), size=batch, replace=False)
        loss = step_loss(model, feats[pick], [seqs[i] for i in pick], image_id, proc.tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 10 == 0:
            curve.append((step, round(float(loss.detach()), 4)))
            log(f"step {step}/{steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - t1:.0f} s)")
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in proj.state_dict().items()}, str(tmp))
    tmp.replace(out)
    meta = {"steps": done, "resumed": bool(resume and found["projector"]), "batch": batch, "lr": lr, "items": len(items), "seconds": round(time.perf_counter() - t1),
            "curve": curve, "where": "CPU, 2 cores" if not torch.cuda.is_available() else "GPU"}
    out.with_name("train_log.json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmlens.real.train", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-shapes", type=int, default=3000)
    ap.add_argument("--n-photos", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    ap.add_argument("--resume", action="store_true", help="continue from the shipped projector (default: start fresh)")
    a = ap.parse_args(argv)
    meta = train(a.steps, a.batch, a.lr, a.n_shapes, a.n_photos,
                 time_budget=None if a.minutes is None else 60 * a.minutes, resume=a.resume)
    print(json.dumps({k: v for k, v in meta.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
