"""Capture's peak memory on a 16-frame video, next to plain SDPA and eager ``output_attentions``.

Video is where eager attention runs out of memory: every layer's [heads, n, n] weights are kept,
and a video makes n large. A random Qwen2-VL whose language model has the ``mid`` shape (12 layers
x d_model 768, 12 heads; a 2-layer vision tower of width 64 with Qwen2-VL's real patching: 14 px
patches, 2x2 merge, 2 frames per temporal slot) reads a 16-frame video sampled from a random clip,
at frame sizes giving 8 temporal slots of 64, 256 and 576 tokens (512, 2048, 4608 video tokens).
For each size and variant -- (a) plain SDPA ``generate``, (b) ``vl.capture``, (c) eager ``generate``
with ``output_attentions=True, output_hidden_states=True`` -- a fresh subprocess builds the model,
warms up with a one-token plain generate on the same video, then runs the variant once and reads
its peak RSS above the RSS before the warm-up (CUDA: ``max_memory_allocated`` above the allocation
after it).

    python benchmarks/bench_video.py                      # CPU float32, 2 new tokens
    python benchmarks/bench_video.py --device cuda --dtype bfloat16 --sides 448x448,896x504
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._children import add_child_args, run_child  # noqa: E402
from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_capture import PRESETS, _rss, _sync  # noqa: E402

NAMES = ("plain", "capture", "eager")
LABEL = {"plain": "(a) plain SDPA", "capture": "(b) vl.capture", "eager": "(c) eager + outputs"}
FRAMES = 16
PROMPT = "Describe what happens in the video, frame by frame."


def build(preset: str, device: str, dtype: torch.dtype):
    """A random Qwen2-VL with ``preset``'s language-model shape and Qwen2-VL's real video patching."""
    import transformers

    from vlmlens.models.families import get_arch
    from vlmlens.models.loading import LoadedModel
    from vlmlens.models.tiny_processors import TinyProcessorSpec, build_processor

    p = PRESETS[preset]
    proc = build_processor(TinyProcessorSpec("qwen2_vl", image_size=224, patch_size=14, extra=dict(
        merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=1024 * 1024)))
    tok = proc.tokenizer
    head = p["d"] // p["heads"]
    half = head // 2                     # M-RoPE splits the rotary half-dim over (time, height, width): 1/4, 3/8, 3/8
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t_sec, h_sec, half - t_sec - h_sec]}
    text = transformers.Qwen2VLTextConfig(
        hidden_size=p["d"], intermediate_size=p["ffn"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"], vocab_size=max(p["vocab"], len(tok)), max_position_embeddings=32768,
        rope_parameters=rope, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = transformers.Qwen2VLVisionConfig(depth=2, embed_dim=64, num_heads=2, hidden_size=p["d"], mlp_ratio=2,
                                              in_channels=3, patch_size=14, spatial_merge_size=2,
                                              temporal_patch_size=2)
    cfg = transformers.Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None          # random weights: generate exactly the asked length
    model.generation_config.suppress_tokens = sorted(set(tok.all_special_ids))
    return LoadedModel(model, proc, get_arch("qwen2_vl"), f"bench-video:{preset}", torch.device(device), dtype)


def clip(size: tuple[int, int]):
    import vlmlens as vl

    w, h = size
    rng = np.random.default_rng(0)
    return vl.load_video(rng.integers(0, 256, (FRAMES, h, w, 3), dtype=np.uint8), frames=FRAMES)


def variant(lm, name: str, n_new: int, video):
    """Run one variant; return (bytes of arrays it keeps, video tokens)."""
    import vlmlens as vl
    from vlmlens.capture import greedy_generate, image_positions, prepare_inputs

    inputs, _, _ = prepare_inputs(lm, video, PROMPT)
    n_video = len(image_positions(lm, inputs["input_ids"]))
    if name == "capture":
        run = vl.capture(lm, video, PROMPT, max_new_tokens=n_new)
        return sum(a.nbytes for a in run.arrays.values()), n_video
    if name == "plain":
        with torch.no_grad():
            greedy_generate(lm, inputs, n_new)
        return 0, n_video
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = lm.model.generate(**inputs, max_new_tokens=n_new, do_sample=False, output_attentions=True,
                                    output_hidden_states=True, return_dict_in_generate=True)
        kept = sum(t.numel() * t.element_size() for step in out.attentions for t in step)
        kept += sum(t.numel() * t.element_size() for step in out.hidden_states for t in step)
        return kept, n_video
    finally:
        lm.model.set_attn_implementation("sdpa")


def child(preset, device, dtype_name, size, name, n_new) -> None:
    dev = torch.device(device)
    lm = build(preset, device, getattr(torch, dtype_name))
    video = clip(size)
    before = _rss() if dev.type != "cuda" else 0
    variant(lm, "plain", 1, video)                       # warm-up on the same video
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    kept, n_video = variant(lm, name, n_new, video)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - before if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    print(json.dumps({"seconds": seconds, "peak": int(peak), "kept": int(kept), "n_video": n_video}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_child_args(ap, PRESETS, new_tokens=2)
    ap.add_argument("--sizes", default="224x224,448x448,672x672", help="frame sizes WxH (8 slots of (W/28)(H/28) tokens)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        w, h = (int(x) for x in a.child[0].split("x"))
        child(a.preset, a.device, a.dtype, (w, h), a.child[1], a.new_tokens)
        return 0
    res: dict = {}
    for size in a.sizes.split(","):
        for name in NAMES:
            res[(size, name)] = out = run_child(__file__, a, size, name)
            print(size, name, out, flush=True)
    mib = 2 ** 20
    rows = ["| frame size | video tokens | " + " | ".join(f"{LABEL[n]} peak MiB" for n in NAMES)
            + " | arrays kept by (b) MiB | (c)/(b) peak | (b) s | (c) s |", "|---" * 9 + "|"]
    for size in a.sizes.split(","):
        r = {n: res[(size, n)] for n in NAMES}
        nv = next((x["n_video"] for x in r.values() if "n_video" in x), "?")
        cell = lambda x: f"{x['peak'] / mib:.0f}" if "peak" in x else x["error"]      # noqa: E731
        ratio = (f"{r['eager']['peak'] / r['capture']['peak']:.1f}" if "peak" in r["eager"] and "peak" in r["capture"]
                 else "–")
        secs = [f"{r[n]['seconds']:.1f}" if "seconds" in r[n] else "–" for n in ("capture", "eager")]
        kept = f"{r['capture']['kept'] / mib:.1f}" if "kept" in r["capture"] else "–"
        rows.append(f"| {size} | {nv} | " + " | ".join(cell(r[n]) for n in NAMES) + f" | {kept} | {ratio} | "
                    + " | ".join(secs) + " |")
    body = (f"Random Qwen2-VL, language model {a.preset} ({PRESETS[a.preset]['layers']} layers x "
            f"{PRESETS[a.preset]['d']}, {PRESETS[a.preset]['heads']} heads), {FRAMES} frames (8 temporal slots), "
            f"{a.new_tokens} new tokens, {a.device} {a.dtype}, torch {torch.__version__}, {a.threads} threads; "
            "one run per cell in a fresh process after a warm-up.\n\n" + "\n".join(rows))
    print(body)
    if not a.no_write:
        write_section(f"bench_video_{a.preset}_{a.device}", f"Video: 16 frames, capture vs eager ({a.preset}, {a.device})",
                      body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
