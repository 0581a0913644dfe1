"""Training loop for the tiny shapes VLM (CPU friendly, seeded, on-the-fly data).

Every step draws fresh scenes from the *train* seed range, mixes the three task
families, and trains with cross-entropy on the answer tokens (+ ``</s>``) only.
Each answer token is weighted 1/sqrt(answer length) so that one-word answers are
not drowned out by long captions.

A training sequence is a conversation of up to ``turns`` questions about one scene
("USER: <image> Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>..."), rendered exactly as
the chat template renders it.  The 64 image tokens and the vision tower then pay for
several answers instead of one: one-word answers give one token of signal each, and
finding an object by its shape or comparing two objects' columns only came after many
thousands of them.  The first turn is the single-turn prompt every consumer uses.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..schedule import warmup_cosine
from .model import TinyArch, build_model, count_params
from .scenes import COLORS, IMAGE_SIZE, MAX_OBJECTS, SHAPES, SIZES, Scene, make_scene
from .tasks import FAMILIES, SPLITS, make_example
from .tokenizer import PATCH_SIZE, FastEncoder, build_processor, pixels

# colour, shape, size of the object on the patch (0 = background), and the 3x3 layout
# row / column the patch lies in (so the features also carry position)
AUX_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1, 3, 3)


def patch_labels(scene: Scene) -> np.ndarray:
    """(5, G*G) colour/shape/size class of the object covering each patch centre (0 = none),
    then the layout row and column of the patch centre."""
    g = IMAGE_SIZE // PATCH_SIZE
    out = np.zeros((len(AUX_CLASSES), g * g), dtype=np.int64)
    from .scenes import _RADIUS

    for i in range(g):
        for j in range(g):
            cx, cy = j * PATCH_SIZE + PATCH_SIZE / 2, i * PATCH_SIZE + PATCH_SIZE / 2
            out[3, i * g + j] = int(cy * 3 // IMAGE_SIZE)
            out[4, i * g + j] = int(cx * 3 // IMAGE_SIZE)
            for o in scene.objects:
                r = _RADIUS[o.size] + 0.5
                if abs(cx - o.x) <= r and abs(cy - o.y) <= r:
                    out[:3, i * g + j] = (COLORS.index(o.color) + 1, SHAPES.index(o.shape) + 1,
                                         SIZES.index(o.size) + 1)
    return out


@dataclass
class TrainConfig:
    steps: int = 2200
    batch_size: int = 32
    lr: float = 1.5e-3
    min_lr_frac: float = 0.03
    warmup: int = 200
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    bf16: bool = False
    family_weights: tuple = (0.5, 0.15, 0.35)  # single, caption, reasoning (per turn)
    turns: int = 4  # questions about the same scene per training sequence
    max_len: int = 224  # stop adding turns to a sequence beyond this many tokens
    aux_weight: float = 1.0  # patch-attribute loss on the vision tower (training only)
    # curriculum: P(1..4 objects) for the first `curriculum_frac` of training, then uniform
    early_objects: tuple = (0.4, 0.3, 0.15, 0.15)
    curriculum_frac: float = 0.25
    # phase 0: train only vision tower + projector on the patch-attribute task so that the
    # decoder starts from image tokens that already carry colour/shape/size/position
    vision_warmup_steps: int = 800
    aux_bg_weight: float = 0.2  # weight of background patches in the attribute loss
    eval_every: int = 200
    save_every: int = 400
    arch: TinyArch = field(default_factory=TinyArch)


class Batcher:
    """Deterministic stream of padded training batches."""

    def __init__(self, enc: FastEncoder, cfg: TrainConfig, split: str = "train", offset: int = 0):
        self.enc, self.cfg = enc, cfg
        self.rng = np.random.default_rng([cfg.seed, 99])
        self.next_seed = SPLITS[split][0] + offset
        self.limit = SPLITS[split][1]

    def _family(self) -> str:
        w = np.array(self.cfg.family_weights, dtype=np.float64)
        return FAMILIES[int(self.rng.choice(3, p=w / w.sum()))]

    def _scene(self, object_probs=None):
        if self.next_seed >= self.limit:
            raise RuntimeError("ran out of seeds in split")
        seed, scene = self.next_seed, None
        self.next_seed += 1
        if object_probs is not None:
            k = int(self.rng.choice(MAX_OBJECTS, p=np.asarray(object_probs) / np.sum(object_probs))) + 1
            scene = make_scene(seed, n_objects=k)
        return seed, scene

    def examples(self, n: int, families=None, object_probs=None):
        """``n`` single-turn examples (validation; ``families`` fixes each one's family)."""
        out = []
        for fam in families or [self._family() for _ in range(n)]:
            seed, scene = self._scene(object_probs)
            out.append([make_example(seed, fam, scene=scene)])
        return out

    def episodes(self, n: int, object_probs=None):
        """``n`` training conversations: up to ``cfg.turns`` distinct questions about one scene
        each, families drawn per turn, cut at ``cfg.max_len`` tokens."""
        out = []
        for _ in range(n):
            seed, scene = self._scene(object_probs)
            turns, prompts, families, length = [], set(), set(), len(self.enc.head)
            for v in range(self.cfg.turns * 2):  # a few spare draws for repeated questions
                if len(turns) == self.cfg.turns:
                    break
                ex = make_example(seed, self._family(), scene=scene, variant=v)
                # one caption per scene (its prompts differ, the answer does not)
                if ex.prompt in prompts or (ex.family == "caption" and "caption" in families):
                    continue
                n_tok = len(self.enc.turn_ids(ex.prompt, first=not turns)) + len(self.enc.answer_ids(ex.answer))
                if turns and length + n_tok > self.cfg.max_len:
                    break
                turns.append(ex)
                prompts.add(ex.prompt)
                families.add(ex.family)
                length += n_tok
            out.append(turns)
        return out

    def collate(self, episodes):
        """Pad conversations (lists of Examples about one scene) into one batch; targets are
        every answer's tokens + ``</s>``."""
        import torch

        seqs, spans = [], []
        for turns in episodes:
            ids, sp = list(self.enc.head), []
            for i, ex in enumerate(turns):
                ids += self.enc.turn_ids(ex.prompt, first=i == 0)
                a = self.enc.answer_ids(ex.answer)
                sp.append((len(ids), len(ids) + len(a)))
                ids += a
            seqs.append(ids)
            spans.append(sp)
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.enc.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        target = torch.full((len(seqs), L), -100, dtype=torch.long)
        weight = torch.zeros((len(seqs), L), dtype=torch.float32)
        for i, (s, sp) in enumerate(zip(seqs, spans)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            for a, b in sp:
                # logits at position t predict token t+1
                target[i, a - 1: b - 1] = torch.tensor(s[a:b])
                weight[i, a - 1: b - 1] = 1.0 / math.sqrt(b - a)
        scenes = [turns[0].scene for turns in episodes]
        pv = torch.from_numpy(np.stack([pixels(sc.image) for sc in scenes]))
        aux = torch.from_numpy(np.stack([patch_labels(sc) for sc in scenes]))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv,
                "target": target, "weight": weight, "patch_labels": aux}


def batch_loss(model, batch, bf16: bool = False):
    """(weighted loss, per-example exact-match under teacher forcing)."""
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
    logits = logits.float()
    tgt = batch["target"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                         ignore_index=-100, reduction="none").view(tgt.shape)
    w = batch["weight"]
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        ok = (logits.argmax(-1) == tgt) | (tgt == -100)
        exact = ok.all(dim=1)
    return loss, exact


def aux_loss(head, hidden, labels, bg_weight: float = 0.2):
    """Mean CE of the per-image-token attribute classifiers (object tokens weighted 1,
    background tokens ``bg_weight``)."""
    import torch
    import torch.nn.functional as F

    logits = head(hidden.float())  # (B, 64, classes): projector output, CLS already dropped
    w = torch.where(labels[:, 0] > 0, 1.0, bg_weight)
    total, start = 0.0, 0
    for k, n in enumerate(AUX_CLASSES):
        part = logits[..., start: start + n]
        ce = F.cross_entropy(part.reshape(-1, n), labels[:, k].reshape(-1), reduction="none")
        total = total + (ce.view(w.shape) * w).sum() / w.sum()
        start += n
    return total / len(AUX_CLASSES)


def vision_warmup(model, aux_head, captured, batcher, cfg, log=print):
    """Phase 0: vision tower + projector + aux head only (the decoder is not run)."""
    import torch
    from tqdm import tqdm

    params = (list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
              + list(aux_head.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    bar = tqdm(range(cfg.vision_warmup_steps), desc="vision warm-up", file=sys.stdout, mininterval=5.0, ncols=100)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        scenes = [make_scene(s) for s in range(batcher.next_seed, batcher.next_seed + cfg.batch_size)]
        batcher.next_seed += cfg.batch_size
        pv = torch.from_numpy(np.stack([pixels(sc.image) for sc in scenes]))
        labels = torch.from_numpy(np.stack([patch_labels(sc) for sc in scenes]))
        model.model.get_image_features(pixel_values=pv)
        loss = aux_loss(aux_head, captured.pop("h"), labels, cfg.aux_bg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        bar.set_postfix(aux=f"{loss.item():.3f}", refresh=False)
    log(f"vision warm-up done: aux loss {loss.item():.4f}")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return warmup_cosine(cfg.lr, step, cfg.warmup, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), cfg.min_lr_frac)


def validate(model, enc, cfg: TrainConfig, n_per_family: int = 64) -> dict:
    """Teacher-forced exact match on fixed val examples (== greedy exact match)."""
    import torch

    model.eval()
    out = {}
    b = Batcher(enc, cfg, split="val")
    with torch.no_grad():
        for fam in FAMILIES:
            exs = b.examples(n_per_family, families=[fam] * n_per_family)
            hits = 0
            for i in range(0, len(exs), 32):
                _, exact = batch_loss(model, b.collate(exs[i: i + 32]), cfg.bf16)
                hits += int(exact.sum())
            out[fam] = hits / len(exs)
    model.train()
    return out


def _save(model, processor, out_dir: str, meta: dict):
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)


def train(out_dir: str, cfg: TrainConfig, log=print) -> dict:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    enc = FastEncoder(processor.tokenizer)
    model = build_model(cfg.arch, processor.tokenizer, seed=cfg.seed)
    model.train()
    # Training-only auxiliary head: a linear classifier of each image token's colour / shape /
    # size / layout cell, read from the projector output (the decoder's image embeddings).
    # Without it the decoder sat for thousands of steps on a language-prior plateau: the
    # projected tokens carried colour but barely any shape (linear probe ~60%), so nothing
    # could be read out.  The head is discarded; the saved model is a plain Llava.
    aux_head = torch.nn.Linear(cfg.arch.text_dim, sum(AUX_CLASSES))
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("h", out))
    params = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux_head.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    batcher = Batcher(enc, cfg)
    log(f"params={count_params(model):,} steps={cfg.steps} batch={cfg.batch_size} "
        f"threads={cfg.threads} bf16={cfg.bf16}")
    t0 = time.time()
    if cfg.vision_warmup_steps:
        vision_warmup(model, aux_head, captured, batcher, cfg, log)
    history, ema = [], None
    bar = tqdm(range(cfg.steps), desc="train", file=sys.stdout, mininterval=5.0,
               dynamic_ncols=False, ncols=100)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        early = step < cfg.curriculum_frac * cfg.steps
        batch = batcher.collate(batcher.episodes(cfg.batch_size,
                                                 object_probs=cfg.early_objects if early else None))
        lm_loss, _ = batch_loss(model, batch, cfg.bf16)
        aux = aux_loss(aux_head, captured.pop("h"), batch["patch_labels"], cfg.aux_bg_weight)
        loss = lm_loss + cfg.aux_weight * aux if cfg.aux_weight else lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lv = lm_loss.detach().item()
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}")
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.set_postfix(loss=f"{ema:.4f}", aux=f"{aux.item():.3f}", lr=f"{_lr_at(step, cfg):.1e}", refresh=False)
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            val = validate(model, enc, cfg)
            rec = {"step": step + 1, "loss_ema": round(ema, 5), "elapsed_s": round(time.time() - t0, 1),
                   "val_exact": val}
            history.append(rec)
            log(json.dumps(rec))
        if ((step + 1) % cfg.save_every == 0) or last:
            meta = {"config": _cfg_dict(cfg), "steps_done": step + 1, "wall_time_s": round(time.time() - t0, 1),
                    "train_seeds": [SPLITS["train"][0], batcher.next_seed], "history": history,
                    "torch": torch.__version__, "params": count_params(model)}
            _save(model, processor, out_dir, meta)
    return {"wall_time_s": time.time() - t0, "history": history}


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["family_weights"] = list(cfg.family_weights)
    d["early_objects"] = list(cfg.early_objects)
    return d
