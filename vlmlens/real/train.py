"""Train smol-shapes' projector (EfficientNet-Lite0 features -> SmolLM2's embedding space) and
LoRA adapters on the language model.

The tower and the LM's weights stay frozen; the projector (1280 -> 576 -> 576, GELU) and, with
``lora > 0``, peft LoRA adapters on every decoder projection learn, with the gradient going back
through the whole language model. Items: the shapes world's conversations (single-word answers,
captions, reasoning traces: the tiny-shapes tasks, train split), real photos with augmentation
(random crops, flips, colour jitter) whose targets come from the encoder's own ImageNet head
("a photo of a tiger cat": the classifier distilled into words), and text-only chat whose
targets are the LM's own answers before training (so the adapters keep its plain chat).

The encoder's features are computed once per item before training (the tower is frozen), so a
step costs one LM forward + backward (bf16 autocast on CPU: measured 2x faster than float32).
``python -m vlmlens.real.train --steps N`` writes ``assets/smol-shapes/projector.safetensors``
(or ``out``), the adapters into ``lm_lora/`` and ``train_log.json`` next to it; both files are
rewritten (atomically) every ``save_every`` seconds, so a long run can be stopped at any time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..experiments.recovery import LORA_TARGETS
from ..schedule import warmup_cosine
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
TRAIN_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field",
                "immunohistochemistry")
#: more training photos from opencv-doc (none of them shows what a held-out photo shows)
TRAIN_PHOTOS_OPENCV = ("aero1.jpg", "building.jpg", "home.jpg", "squirrel_cls.jpg", "starry_night.jpg",
                       "smarties.png", "rubberwhale1.png", "HappyFish.jpg", "chicky_512.png", "blox.jpg",
                       "graf1.png", "leuvenA.jpg", "aloeL.jpg", "basketball1.png", "box_in_scene.png",
                       "Blender_Suzanne1.jpg", "licenseplate_motion.jpg")
#: text-only prompts whose answers (the LM's own, before training) keep its plain chat
TEXT_PROMPTS = (
    "What is the capital of France?", "What is the capital of Japan?", "How many days are in a week?",
    "What colour is the sky on a clear day?", "Name three fruits.", "What is 12 plus 7?",
    "Who wrote Romeo and Juliet?", "What is water made of?", "Translate 'thank you' into French.",
    "What is the largest planet in the solar system?", "Give me a synonym for happy.",
    "What do bees make?", "How many legs does a spider have?", "What is the boiling point of water in Celsius?",
    "Write one sentence about the sea.", "What is a triangle?", "What language is spoken in Brazil?",
    "Say hello in Spanish.", "What is the opposite of cold?", "How many minutes are in an hour?",
    "What animal is known as the king of the jungle?", "What is photosynthesis, in one sentence?",
    "Name a primary colour.", "What is the square root of 81?", "Which month comes after March?",
    "What is the chemical symbol for gold?", "Describe a cat in one sentence.", "What is 5 times 6?",
    "What continent is Egypt in?", "What do you call a baby dog?", "Who painted the Mona Lisa?",
    "What is the freezing point of water in Fahrenheit?",
)
HELD_OUT_PHOTOS = ("baboon.jpg", "fruits.jpg", "butterfly.jpg", "apple.jpg", "orange.jpg", "messi5.jpg")


def load_photo(name: str):
    """One real photo as an RGB PIL image: a scikit-image data name (``TRAIN_PHOTOS``) or a file
    of Debian's opencv-doc examples; None when it is not on this machine."""
    from PIL import Image

    if name in TRAIN_PHOTOS:
        from skimage import data

        try:
            img = getattr(data, name)()
        except Exception:             # some skimage images need a download: offline they are absent
            return None
        return Image.fromarray(np.asarray(img[0] if isinstance(img, tuple) else img)).convert("RGB")
    f = OPENCV_DATA / name
    return Image.open(f).convert("RGB") if f.is_file() else None


def photo_sources(held_out: bool = False) -> list:
    """Real photos: (name, PIL image). ``held_out``: the ones never trained on."""
    names = HELD_OUT_PHOTOS if held_out else TRAIN_PHOTOS + TRAIN_PHOTOS_OPENCV
    return [(n, img) for n in names if (img := load_photo(n)) is not None]


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


def make_items(n_shapes: int, n_photos: int, model, proc, seed: int = 0, weights=(0.5, 0.2, 0.3)):
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
def text_items(model, proc, prompts=TEXT_PROMPTS, max_new_tokens: int = 48) -> list[tuple]:
    """(None, prompt, answer, "text"): the LM's own greedy answers to text-only chat prompts; an
    answer cut by ``max_new_tokens`` is kept without its end of turn."""
    tok, end = proc.tokenizer, proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for q in prompts:
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": q}]}],
                                        add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
        ended = end in gen
        out.append((None, q, tok.decode(gen[:gen.index(end)] if ended else gen), "text" if ended else "text-cut"))
    return out


@torch.no_grad()
def classify(model, proc, images) -> np.ndarray:
    pv = proc.image_processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
    return model.model.vision_tower.classify(pv).argmax(-1).cpu().numpy()


@torch.no_grad()
def features(model, proc, images, batch: int = 32) -> torch.Tensor:
    """[N, 49, 1280] tower features (the projector's input) of ``images``."""
    out = []
    for i in range(0, len(images), batch):
        pv = proc.image_processor(images=images[i:i + batch], return_tensors="pt")["pixel_values"].to(model.device)
        out.append(model.model.vision_tower(pv).last_hidden_state)
    return torch.cat(out)


def encode(proc, prompt: str, answer: str, image: bool = True, end: bool = True) -> tuple[list[int], int]:
    """(token ids of the chat prompt + answer + end of turn, index of the first answer token);
    the image placeholder is expanded to the 49 image tokens the processor would insert."""
    tok = proc.tokenizer
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * 49)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ans = tok(answer + ("<|im_end|>" if end else ""), add_special_tokens=False)["input_ids"]
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
    ids, mask, tgt = ids.to(feats.device), mask.to(feats.device), tgt.to(feats.device)
    emb = model.model.language_model.embed_tokens(ids)
    slots = ids == image_id
    has = slots.any(1)                                                   # text-only rows have none
    if bool(has.any()):
        img = model.model.multi_modal_projector(feats[has])              # [B', 49, d]
        emb = emb.masked_scatter(slots[..., None], img.to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    logits = model.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


def add_lora(model, rank: int, seed: int = 0, resume_from: Path | None = None):
    """peft LoRA adapters on every decoder projection of the LM (fresh, B = 0; or ``resume_from``,
    trainable); returns the PeftModel (the LM's modules are changed in place)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ..models.adapters import quietly

    lm = model.model.language_model
    if resume_from is not None:
        return quietly(lambda: PeftModel.from_pretrained(lm, str(resume_from), is_trainable=True))
    torch.manual_seed(seed)
    conf = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none")
    return quietly(lambda: get_peft_model(lm, conf))


def save_parts(proj, pm, out: Path, meta: dict) -> None:
    """The projector (bf16 safetensors), the adapters (peft's format, bf16) in ``lm_lora/`` and
    ``train_log.json`` next to ``out``; each written to a temporary name and renamed."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().to(torch.bfloat16).contiguous() for k, v in proj.state_dict().items()}, str(tmp))
    tmp.replace(out)
    if pm is not None:
        dst = out.parent / "lm_lora"
        tmpd = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmpd, ignore_errors=True)
        pm.save_pretrained(str(tmpd), safe_serialization=True)
        f = tmpd / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(f)).items()}, str(f))
        (tmpd / "README.md").unlink(missing_ok=True)              # peft's empty card template
        shutil.rmtree(dst, ignore_errors=True)
        tmpd.replace(dst)
    log_tmp = out.with_name("train_log.json.tmp")
    log_tmp.write_text(json.dumps(meta, indent=1))
    log_tmp.replace(out.with_name("train_log.json"))


def train(steps: int = 300, batch: int = 8, lr: float = 1e-3, n_shapes: int = 3000, n_photos: int = 300,
          seed: int = 0, out: Path = PROJECTOR, log=print, time_budget: float | None = None,
          resume: bool = False, lora: int = 8, lora_lr: float = 3e-4, n_text: int = 200,
          bf16: bool | None = None, save_every: float = 600.0) -> dict:
    """Train the projector and (``lora`` > 0) LM adapters; ``resume``: from the shipped ones, else
    fresh. The learning rate follows a cosine over ``steps`` or ``time_budget`` s, whichever ends
    first."""
    from .build import LM_ADAPTER, load_projector

    torch.manual_seed(seed)
    out = Path(out)
    model, proc, _ = assemble(log, trained=False)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.float().eval().to(dev)
    resumed = bool(resume and PROJECTOR.is_file())
    if resumed:
        load_projector(model, PROJECTOR)
    for p in model.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    items = make_items(n_shapes, n_photos, model, proc, seed)
    texts = text_items(model, proc, TEXT_PROMPTS[:n_text]) if n_text else []   # before any adapter
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    pm = None
    if lora:
        pm = add_lora(model, lora, seed, LM_ADAPTER if resume and (LM_ADAPTER / "adapter_config.json").is_file() else None)
    groups = [{"params": list(proj.parameters()), "lr": lr}]
    if pm is not None:
        groups.append({"params": [p for p in pm.parameters() if p.requires_grad], "lr": lora_lr})
    feats = features(model, proc, [it[0] for it in items])
    seqs = [encode(proc, it[1], it[2]) for it in items]
    if texts:                   # text rows: repeated up to n_text, no image (their features are unused)
        reps = [texts[i % len(texts)] for i in range(n_text)]
        seqs += [encode(proc, q, a, image=False, end=kind == "text") for _, q, a, kind in reps]
        feats = torch.cat([feats, feats.new_zeros((len(reps), *feats.shape[1:]))])
        items += reps
    log(f"{len(items)} items ({len(texts)} text prompts), features {tuple(feats.shape)} in {time.perf_counter() - t0:.0f} s")
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lr = [g["lr"] for g in groups]
    bf16 = True if bf16 is None else bf16            # CPU: measured 2x faster than float32; GPU: bf16 is native
    rng = np.random.default_rng(seed)
    curve, t1, last_save, done = [], time.perf_counter(), time.perf_counter(), 0
    meta = {}
    for step in range(steps):
        elapsed = time.perf_counter() - t1
        if time_budget is not None and elapsed > time_budget:
            break
        prog = max(step / steps, elapsed / time_budget if time_budget else 0.0)
        for g, b in zip(opt.param_groups, base_lr):
            g["lr"] = warmup_cosine(b, step, 20, prog)
        pick = rng.choice(len(items), size=min(batch, len(items)), replace=False)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_loss(model, feats[pick], [seqs[i] for i in pick], image_id, proc.tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        done = step + 1
        if step % 10 == 0:
            curve.append((step, round(float(loss.detach()), 4)))
            log(f"step {step}/{steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - t1:.0f} s)")
        meta = {"steps": done, "resumed": resumed, "batch": batch, "lr": lr, "lora_rank": lora, "lora_lr": lora_lr,
                "bf16_autocast": bf16, "items": len(items), "seconds": round(time.perf_counter() - t1),
                "curve": curve, "where": "CPU, 2 cores" if not torch.cuda.is_available() else "GPU"}
        if time.perf_counter() - last_save > save_every:
            save_parts(proj, pm, out, meta)
            last_save = time.perf_counter()
    meta["seconds"] = round(time.perf_counter() - t1)
    save_parts(proj, pm, out, meta)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmlens.real.train", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-shapes", type=int, default=3000)
    ap.add_argument("--n-photos", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    ap.add_argument("--lora", type=int, default=8, help="LoRA rank on the LM's projections (0: projector only)")
    ap.add_argument("--lora-lr", type=float, default=3e-4)
    ap.add_argument("--n-text", type=int, default=200, help="text-only chat rows (the LM's own answers)")
    ap.add_argument("--resume", action="store_true", help="continue from the shipped projector/adapters (default: fresh)")
    a = ap.parse_args(argv)
    meta = train(a.steps, a.batch, a.lr, a.n_shapes, a.n_photos,
                 time_budget=None if a.minutes is None else 60 * a.minutes, resume=a.resume,
                 lora=a.lora, lora_lr=a.lora_lr, n_text=a.n_text)
    print(json.dumps({k: v for k, v in meta.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
