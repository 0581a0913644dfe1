"""One smol-shapes training step (batch 8, frozen LM, gradient through all 30 layers) in float32
vs bf16 autocast, projector only vs projector + LoRA r 8: seconds per step, side by side in one run.

    python benchmarks/bench_smol_train.py [--steps 4]

Needs smol-shapes' parts (bash scripts/install.sh --smol). The first step of each setting is a
warm-up and is not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from vlmlens.real import train as T
from vlmlens.real.build import IMAGE_TOKEN, assemble


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    model, proc, _ = assemble(lambda s: None, trained=False)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    for p in proj.parameters():
        p.requires_grad_(True)
    items = T.make_items(64, 0, model, proc, 0)
    feats = T.features(model, proc, [it[0] for it in items])
    seqs = [T.encode(proc, it[1], it[2]) for it in items]
    iid, pad = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), proc.tokenizer.pad_token_id
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)            # noqa: E731

    def per_step(ctx, params) -> float:
        opt = torch.optim.AdamW(params, lr=1e-4)
        rng, ts = np.random.default_rng(0), []
        for _ in range(a.steps + 1):
            pick = rng.choice(len(items), 8, replace=False)
            t = time.perf_counter()
            with ctx():
                loss = T.step_loss(model, feats[pick], [seqs[i] for i in pick], iid, pad)
            loss.backward()
            opt.step()
            opt.zero_grad()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts[1:]))

    rows = [("projector, float32", per_step(contextlib.nullcontext, list(proj.parameters()))),
            ("projector, bf16 autocast", per_step(bf16, list(proj.parameters())))]
    pm = T.add_lora(model, 8)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    rows += [("projector + LoRA r8, float32", per_step(contextlib.nullcontext, list(proj.parameters()) + lora)),
             ("projector + LoRA r8, bf16 autocast", per_step(bf16, list(proj.parameters()) + lora))]
    print(f"| setting (batch 8, mean {np.mean([len(s) for s, _ in seqs]):.0f} tokens) | s / step (median) |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
