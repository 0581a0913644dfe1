"""LoRA recovery of truncated models: fine-tune with the truncation active, then measure it.

Ghosh et al. report that fine-tuning partially recovers a model whose image is cut from decoder
layer k on, that recovery is limited for precise tasks, and that explicit reasoning does not
make up for reduced visual depth. Here:

* :func:`train_recovery` adds LoRA adapters (``peft``) to the language model's attention and
  MLP projections -- only the decoder's, never the vision tower's -- and trains them on
  (image, prompt, answer) items with ``Truncate(k)`` applied through the lens during every
  training forward (the same lens, batched as in :mod:`.batch`): so what is learnt is how to
  answer *without* the image past layer k. The loss is the answer tokens' cross-entropy
  (teacher-forced; the answer followed by the end-of-sequence token).
* adapters are saved in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)
  and load with ``load_model(name, adapter=DIR)`` (merged into the weights on load: every
  lens path stays the plain model's) and in the dashboard (``python app.py --adapter DIR``).
* :func:`recovery_study` trains one adapter per depth and evaluates, per task family, the
  untruncated model, the truncated model, and the truncated model with its adapter, and what
  share of the truncation's loss the adapter wins back.

Training items: tiny-shapes' own generator (its train split: single answers, captions,
reasoning traces, the same tasks and scorers as its test split) or a user's dataset
(:mod:`vlmlens.data`, rows with answers).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..interventions import Truncate
from ..schedule import warmup_cosine
from ..lens import NOTHING, Lens, Plan
from .batch import _position_ids, collate, extend_batch
from ..capture import prepare
from .prefix import accepts_logits_to_keep

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class RecoveryConfig:
    """How adapters are trained (defaults: tiny-shapes, a few minutes per depth on 2 CPU cores)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple = LORA_TARGETS
    seed: int = 0
    family_weights: tuple = (0.5, 0.2, 0.3)     # tiny-shapes items: single, caption, reasoning

    def check(self) -> None:
        for name in ("steps", "batch_size", "rank", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"recovery {name} must be a positive integer, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise InputError(f"recovery lr must be a number in (0, 1), got {self.lr!r}")


# ---- items ------------------------------------------------------------------------------------

def shapes_items(n: int, *, split: str = "train", seed: int = 0, weights=(0.5, 0.2, 0.3), offset: int = 0):
    """``n`` (image, prompt, answer, family) items of the shapes world (``split``: train / val / test)."""
    from ..tiny.tasks import FAMILIES, SPLITS, make_example

    rng = np.random.default_rng([seed, 7])
    w = np.asarray(weights, dtype=np.float64)
    lo = SPLITS[split][0] + offset
    out = []
    for i in range(n):
        fam = FAMILIES[int(rng.choice(3, p=w / w.sum()))]
        ex = make_example(lo + i, fam)
        out.append((ex.scene.image, ex.prompt, ex.answer, fam))
    return out


def dataset_items(dataset) -> list[tuple]:
    """(image, prompt, answer, task) of every row of a :class:`vlmlens.data.Dataset` with an answer
    (the first, for rows with several)."""
    out = [(it.image, it.prompt, it.answers[0], it.task) for it in dataset.items if it.answers]
    if not out:
        raise InputError("the training dataset has no rows with answers")
    return out


# ---- adapters ---------------------------------------------------------------------------------

def decoder_targets(lm, names: Sequence[str] = LORA_TARGETS) -> list[str]:
    """Full names of the decoder layers' projection modules called ``names`` (the vision tower's
    own q/k/v projections are left out)."""
    layers = {id(l) for l in lm.arch.decoder_layers(lm.model)}
    prefixes = [n for n, m in lm.model.named_modules() if id(m) in layers]
    out = [n for n, m in lm.model.named_modules()
           if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in names and any(n.startswith(p + ".") for p in prefixes)]
    if not out:
        raise InputError(f"no decoder projections named {list(names)} in {lm.name}")
    return out


def add_adapters(lm, cfg: RecoveryConfig):
    """Wrap ``lm.model`` with fresh LoRA adapters (B = 0: outputs unchanged); returns the PeftModel.
    ``lm.model`` itself is modified in place (its projections become LoRA layers)."""
    from peft import LoraConfig, get_peft_model

    from ..models.adapters import quietly

    torch.manual_seed(cfg.seed)
    conf = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=decoder_targets(lm, cfg.targets), bias="none")
    return quietly(lambda: get_peft_model(lm.model, conf))


# ---- loss under truncation ------------------------------------------------------------------

def answer_ids(lm, answer: str) -> list[int]:
    tok = lm.processor.tokenizer
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id if tok.eos_token_id is not None else lm.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return list(ids) + ([int(eos)] if eos is not None else [])


def batch_loss(lm, items, depth: int, *, interventions: Sequence = ()) -> torch.Tensor:
    """Mean answer-token cross-entropy of ``items`` with the image cut from decoder layer
    ``depth`` on (``depth`` = L: untruncated), through the lens, batched (differentiable)."""
    total, n = answer_ce(lm, items, depth, interventions=interventions)
    return total / n


def answer_ce(lm, items, depth: int, *, interventions: Sequence = ()) -> tuple[torch.Tensor, int]:
    """(summed answer-token cross-entropy, number of answer tokens) of :func:`batch_loss`."""
    preps = [prepare(lm, image, prompt) for image, prompt, *_ in items]
    inputs, rows = collate(lm, preps)
    targets = [answer_ids(lm, it[2]) for it in items]
    P = int(inputs["input_ids"].shape[1])
    T = max(len(t) for t in targets)
    inputs, pids = extend_batch(lm, inputs, _position_ids(lm, inputs), targets)
    ivs = list(interventions) + ([Truncate(depth)] if depth < lm.n_layers else [])
    plan = Plan.build([], lm.n_layers, P + T, NOTHING, ivs)
    kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(lm) else {}
    with Lens.for_model(lm, plan, batch=rows):
        logits = lm.model(**inputs, position_ids=pids, use_cache=False, return_dict=True, **kwargs).logits
    logits = logits[:, -(T + 1):-1].float()        # row t predicts target token t
    tgt = torch.full((len(items), T), -100, dtype=torch.long, device=logits.device)
    for b, t in enumerate(targets):
        tgt[b, : len(t)] = torch.as_tensor(t, device=logits.device)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                           reduction="sum")
    return ce, int((tgt != -100).sum())


def eval_loss(lm, items, depth: int, batch_size: int = 16) -> float:
    """Mean answer-token cross-entropy over all of ``items`` (no gradients; the same whatever the batch size)."""
    was = lm.model.training
    lm.model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                s, c = answer_ce(lm, items[i:i + batch_size], depth)
                total, n = total + float(s), n + c
    finally:
        lm.model.train(was)
    return total / n


# ---- training ---------------------------------------------------------------------------------

@dataclass
class TrainLog:
    depth: int
    steps: int
    seconds: float
    train_loss: list          # (step, loss) every few steps
    val_loss_before: float
    val_loss_after: float
    trainable_parameters: int


def train_recovery(lm, depth: int, items, cfg: RecoveryConfig = RecoveryConfig(), *, val_items=None,
                   out: str | Path | None = None, log: Callable[[str], None] | None = None):
    """Train LoRA adapters on ``items`` with the image cut from layer ``depth`` on.

    Returns (the PeftModel wrapping ``lm.model``, TrainLog). With ``out`` the adapters are saved
    there (peft's format, safetensors) with ``recovery.json`` (config + log). The caller removes
    the adapters with ``peft_model.unload()`` when done (``lm.model`` is modified in place)."""
    from ..errors import check_layer

    cfg.check()
    check_layer("recovery depth", depth, 0, lm.n_layers)
    items = list(items)
    if len(items) < cfg.batch_size:
        raise InputError(f"recovery needs at least batch_size={cfg.batch_size} training items, got {len(items)}")
    pm = add_adapters(lm, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    before = eval_loss(lm, val_items, depth, cfg.batch_size) if val_items else float("nan")
    rng = np.random.default_rng(cfg.seed)
    t0, curve = time.perf_counter(), []
    lm.model.train()
    try:
        for step in range(cfg.steps):
            lr = warmup_cosine(cfg.lr, step, cfg.warmup, step / cfg.steps)
            for g in opt.param_groups:
                g["lr"] = lr
            pick = rng.choice(len(items), size=cfg.batch_size, replace=False)
            loss = batch_loss(lm, [items[int(i)] for i in pick], depth)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                curve.append((step, round(float(loss.detach()), 4)))
                if log:
                    log(f"depth {depth} step {step}/{cfg.steps} loss {float(loss.detach()):.3f}")
    finally:
        lm.model.eval()
    after = eval_loss(lm, val_items, depth, cfg.batch_size) if val_items else float("nan")
    tl = TrainLog(depth, cfg.steps, round(time.perf_counter() - t0, 1), curve, before, after, n_train)
    if out is not None:
        save_adapter(pm, out, {"model": lm.name, "depth": depth, "config": asdict(cfg), "log": asdict(tl)})
    return pm, tl


def save_adapter(pm, out, meta: dict) -> Path:
    """Save adapters (peft's format: adapter_config.json + adapter_model.safetensors) and
    ``recovery.json``; written into a temporary folder and renamed, so no partial folder is left."""
    import shutil

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pm.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "recovery.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
