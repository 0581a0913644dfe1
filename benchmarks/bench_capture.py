"""Capture overhead, side by side in one process.

(a) plain SDPA ``generate``; (b) ``vl.capture`` (hidden states + attention to image, SDPA
kept); (c) what peers do: eager attention with ``output_attentions=True,
output_hidden_states=True``. Time: median of interleaved repeats in one process. Peak
memory: each variant in a fresh subprocess (CPU: peak RSS above the RSS before the call;
CUDA: ``max_memory_allocated`` above the allocation before the call).

    python benchmarks/bench_capture.py                 # CPU, mid-size random LLaVA (12 x 768, 576 image tokens)
    python benchmarks/bench_capture.py --preset 7b --device cuda --dtype bfloat16   # LLaVA-1.5-7B shapes
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._report import write_section  # noqa: E402

PRESETS = {
    # decoder layers, d_model, heads, MLP width; CLIP-shaped tower 336/14 -> 576 image tokens
    "mid": dict(layers=12, d=768, heads=12, ffn=3072, vision_d=256, vision_layers=2, vocab=32000),
    "7b": dict(layers=32, d=4096, heads=32, ffn=11008, vision_d=1024, vision_layers=24, vocab=32064),
    "small": dict(layers=4, d=256, heads=4, ffn=1024, vision_d=128, vision_layers=1, vocab=32000),
}


def build(preset: str, device: str, dtype: torch.dtype, side: int = 24):
    """A random LLaVA of ``preset``'s shape whose CLIP tower sees ``14 * side`` pixels, so the
    language model reads ``side * side`` image tokens (24: LLaVA-1.5's 576)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlmlens.models.families import get_arch
    from vlmlens.models.loading import LoadedModel
    from vlmlens.models.tiny_processors import TinyProcessorSpec, build_processor

    p = PRESETS[preset]
    proc = build_processor(TinyProcessorSpec("llava", image_size=14 * side, patch_size=14))
    tok = proc.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=p["vision_d"], intermediate_size=4 * p["vision_d"], num_hidden_layers=p["vision_layers"],
        num_attention_heads=max(1, p["vision_d"] // 64), image_size=14 * side, patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=p["d"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"], vocab_size=max(p["vocab"], len(tok)),
        max_position_embeddings=max(4096, side * side + 512),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    # random weights would often stop early: make every run generate exactly the asked length
    model.generation_config.eos_token_id = None
    model.generation_config.suppress_tokens = sorted(set(tok.all_special_ids))
    return LoadedModel(model, proc, get_arch("llava"), f"bench:{preset}", torch.device(device), dtype)


def image(side: int = 24):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (14 * side, 14 * side, 3), dtype=np.uint8))


PROMPT = "Describe the image in detail and tell me what is in the middle of the picture."


def variant(lm, name: str, n_new: int, side: int = 24):
    """Run one variant; return the bytes of arrays it keeps (for the memory target)."""
    from vlmlens.capture import greedy_generate, prepare_inputs

    import vlmlens as vl

    if name == "capture":
        run = vl.capture(lm, image(side), PROMPT, max_new_tokens=n_new)
        return sum(a.nbytes for a in run.arrays.values())
    inputs, _, _ = prepare_inputs(lm, image(side), PROMPT)
    if name == "plain":
        with torch.no_grad():
            greedy_generate(lm, inputs, n_new)
        return 0
    if name == "eager":
        lm.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = lm.model.generate(
                    **inputs, max_new_tokens=n_new, do_sample=False, output_attentions=True,
                    output_hidden_states=True, return_dict_in_generate=True,
                )
            kept = sum(t.numel() * t.element_size() for step in out.attentions for t in step)
            kept += sum(t.numel() * t.element_size() for step in out.hidden_states for t in step)
            return kept
        finally:
            lm.model.set_attn_implementation("sdpa")
    raise ValueError(name)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(preset, device, dtype_name, name, n_new):
    dtype = getattr(torch, dtype_name)
    lm = build(preset, device, dtype)
    variant(lm, "plain", 1)  # warm up allocator and kernels
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kept = variant(lm, name, n_new)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss()  # the warm-up's high-water mark is below the variant's for all three
        kept = variant(lm, name, n_new)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak": int(peak), "kept": int(kept)}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.preset, a.device, a.dtype, a.memory_child, a.new_tokens)
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    lm = build(a.preset, a.device, dtype)
    names = ["plain", "capture", "eager"]
    for n in names:  # warm-up
        variant(lm, n, 2)
    times = {n: [] for n in names}
    for _ in range(a.repeats):
        for n in names:
            _sync(dev)
            t0 = time.perf_counter()
            variant(lm, n, a.new_tokens)
            _sync(dev)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    print("median seconds:", {n: round(t, 3) for n, t in med.items()}, flush=True)
    mem = {}
    for n in names:
        out = subprocess.run(
            [sys.executable, __file__, "--preset", a.preset, "--device", a.device, "--dtype", a.dtype,
             "--new-tokens", str(a.new_tokens), "--threads", str(a.threads), "--memory-child", n],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"memory run of {n!r} failed:\n{out.stderr[-3000:]}")
        mem[n] = json.loads(out.stdout.strip().splitlines()[-1])
    mb = lambda b: b / 2**20  # noqa: E731
    r_time_a = med["capture"] / med["plain"]
    r_time_c = med["capture"] / med["eager"]
    budget = 1.1 * mem["plain"]["peak"] + mem["capture"]["kept"]
    p = PRESETS[a.preset]
    lines = [
        f"Model: random LLaVA, {p['layers']} layers x d_model {p['d']}, 576 image tokens, {a.new_tokens} new tokens,"
        f" {a.device} {a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; median of {a.repeats}.",
        "",
        "| variant | time (s) | peak memory above start (MiB) | arrays kept (MiB) |",
        "|---|---|---|---|",
    ]
    label = {"plain": "(a) plain SDPA generate", "capture": "(b) vl.capture", "eager": "(c) eager + output_attentions/hidden_states"}
    for n in names:
        lines.append(f"| {label[n]} | {med[n]:.3f} | {mb(mem[n]['peak']):.1f} | {mb(mem[n]['kept']):.1f} |")
    lines += [
        "",
        f"- time (b)/(a) = **{r_time_a:.3f}** (target <= 1.15: {'met' if r_time_a <= 1.15 else 'NOT met'})",
        f"- time (b)/(c) = **{r_time_c:.3f}** (target <= 0.5: {'met' if r_time_c <= 0.5 else 'NOT met'})",
        f"- peak (b) = {mb(mem['capture']['peak']):.1f} MiB vs 1.1 x (a) + arrays kept = {mb(budget):.1f} MiB"
        f" ({'met' if mem['capture']['peak'] <= budget else 'NOT met'}); peak (b)/(a) = {mem['capture']['peak'] / max(1, mem['plain']['peak']):.2f}",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section(f"bench_capture_{a.preset}_{dev.type}", f"Capture overhead ({a.preset}, {dev.type})", text)


if __name__ == "__main__":
    main()
