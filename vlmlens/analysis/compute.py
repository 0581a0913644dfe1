"""Compute trade-off of truncation: FLOPs and KV-cache bytes saved by removing image tokens.

Counting rules (a multiply-add = 2 FLOPs), per decoder layer, for ``q`` query rows attending
to ``P`` (query, key) pairs in total:

* attention projections: ``2 q d hd (2 H + 2 KV)``  (Q and O: H heads; K and V: KV heads);
* attention scores and weighted sum: ``4 H hd P``  (QKᵀ and AV);
* MLP: ``2 q d f m``  (``m`` weight matrices: 3 for gated LLaMA/Qwen MLPs, 2 for plain ones).

Norms, rotary embeddings, softmax, the embedding, the LM head and the vision tower are not
counted (they do not change with truncation depth). The prompt is laid out as
``[system s][image n_img][text t]``; a prefill over ``N = s + n_img + t`` tokens attends
``N (N + 1) / 2`` causal pairs. Truncation at depth ``k`` in ``mode="remove"`` takes the
image rows out of decoder layers ``k..L-1``: those layers process ``s + t`` rows with
``(s + t)(s + t + 1) / 2`` pairs, each decode step sees ``n_img`` fewer keys there, and their
KV cache holds ``n_img`` fewer positions. Depth L is the baseline (saving 0); the saving
grows as k decreases. ``mode="drop"`` gives the same tokens but saves nothing (it masks).

:func:`measure_latency` times prefill and decoding of ``Truncate(k, "remove")`` through the
lens next to the baseline (the same lens, no truncation), so the two can be compared.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LayerShape:
    """What the FLOP and byte counts need from a decoder's config."""

    d_model: int
    d_ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_layers: int
    mlp_matrices: int = 3
    bytes_per_value: int = 2

    @classmethod
    def from_config(cls, cfg, *, mlp_matrices: int = 3, bytes_per_value: int = 2) -> "LayerShape":
        """From a transformers text config (hidden_size, intermediate_size, heads, kv heads, head_dim)."""
        d = int(cfg.hidden_size)
        h = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or h)
        hd = int(getattr(cfg, "head_dim", None) or d // h)
        return cls(d, int(cfg.intermediate_size), h, kv, hd, int(cfg.num_hidden_layers), mlp_matrices, bytes_per_value)

    @classmethod
    def from_model(cls, lm) -> "LayerShape":
        """From a LoadedModel: config numbers, MLP matrices counted in layer 0, KV dtype size."""
        import torch

        layer = lm.arch.decoder_layers(lm.model)[0]
        mlp = getattr(layer, "mlp", None)
        m = sum(isinstance(x, torch.nn.Linear) for x in mlp.modules()) if mlp is not None else 3
        size = torch.empty(0, dtype=lm.dtype).element_size()
        shape = cls.from_config(lm.text_config, mlp_matrices=m or 3, bytes_per_value=size)
        return shape if shape.n_layers == lm.n_layers else _replace(shape, n_layers=lm.n_layers)

    def to_json(self) -> dict:
        return asdict(self)


def _replace(shape: LayerShape, **kw) -> LayerShape:
    return LayerShape(**{**asdict(shape), **kw})


def causal_pairs(n: int) -> int:
    """(query, key) pairs of a causal prefill over n tokens: n (n + 1) / 2."""
    return n * (n + 1) // 2


def layer_flops(shape: LayerShape, n_query: int, n_pairs: int) -> dict:
    """FLOPs of one decoder layer: {"proj", "scores", "mlp", "total"} (module docstring rules)."""
    s = shape
    proj = 2 * n_query * s.d_model * s.head_dim * (2 * s.n_heads + 2 * s.n_kv_heads)
    scores = 4 * s.n_heads * s.head_dim * n_pairs
    mlp = 2 * n_query * s.d_model * s.d_ffn * s.mlp_matrices
    return {"proj": proj, "scores": scores, "mlp": mlp, "total": proj + scores + mlp}


def _check_depth(shape: LayerShape, depth) -> int:
    from ..errors import check_layer

    return check_layer("depth", shape.n_layers if depth is None else depth, 0, shape.n_layers)


def depth_schedule(shape: LayerShape, n_image: int, depth: int | None = None) -> list[int]:
    """Image tokens each decoder layer processes when they leave from layer ``depth`` on (None: never)."""
    k = _check_depth(shape, depth)
    return [n_image if l < k else 0 for l in range(shape.n_layers)]


def _schedule(shape: LayerShape, n_image: int, depth, image_per_layer) -> list[int]:
    if image_per_layer is None:
        return depth_schedule(shape, n_image, depth)
    sched = [int(m) for m in image_per_layer]
    if len(sched) != shape.n_layers or any(not 0 <= m <= n_image for m in sched):
        from ..errors import InputError

        raise InputError(f"image_per_layer must give 0..{n_image} image tokens for each of the {shape.n_layers} layers")
    return sched


def prefill_flops(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, depth: int | None = None, *,
                  image_per_layer=None) -> np.ndarray:
    """[L] prefill FLOPs per decoder layer; image rows removed from layers >= ``depth`` (None: baseline),
    or ``image_per_layer[l]`` image rows in layer l (a pruning schedule; kept tokens keep their order)."""
    sched = _schedule(shape, n_image, depth, image_per_layer)
    out = np.empty(shape.n_layers, dtype=np.float64)
    for l, m in enumerate(sched):
        n = n_system + m + n_text
        out[l] = layer_flops(shape, n, causal_pairs(n))["total"]
    return out


def decode_flops(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, n_steps: int = 16,
                 depth: int | None = None, *, image_per_layer=None) -> np.ndarray:
    """[L] FLOPs of ``n_steps`` decode forwards (one new token each) per decoder layer."""
    sched = _schedule(shape, n_image, depth, image_per_layer)
    out = np.zeros(shape.n_layers, dtype=np.float64)
    for l, m in enumerate(sched):
        ctx = n_system + m + n_text
        pairs = sum(ctx + i + 1 for i in range(n_steps))  # step i attends to the prompt, i earlier steps, itself
        out[l] = layer_flops(shape, n_steps, pairs)["total"]
    return out


def rerank_decode_flops(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, n_steps: int = 16, *,
                        image_per_layer=None, from_layer: int = 0) -> np.ndarray:
    """[L] FLOPs of ``n_steps`` decode steps when the kept image tokens are re-ranked at every step
    (FastV as its evaluation runs it): layers below ``from_layer`` see every token and decode with
    their cache (one new row a step); layers from ``from_layer`` on hold a different kept set each
    step, so they recompute every row of the sequence (kept image + text + tokens so far)."""
    sched = _schedule(shape, n_image, None, image_per_layer)
    out = np.zeros(shape.n_layers, dtype=np.float64)
    for l, m in enumerate(sched):
        ctx = n_system + m + n_text
        if l < from_layer:
            out[l] = layer_flops(shape, n_steps, sum(ctx + i + 1 for i in range(n_steps)))["total"]
        else:
            out[l] = sum(layer_flops(shape, ctx + i + 1, causal_pairs(ctx + i + 1))["total"] for i in range(n_steps))
    return out


def kv_cache_bytes(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, n_generated: int = 0,
                   depth: int | None = None, *, image_per_layer=None) -> np.ndarray:
    """[L] KV-cache bytes per decoder layer after ``n_generated`` tokens (K and V, all kv heads)."""
    sched = _schedule(shape, n_image, depth, image_per_layer)
    per_token = 2 * shape.n_kv_heads * shape.head_dim * shape.bytes_per_value
    return np.array([per_token * (n_system + m + n_text + n_generated) for m in sched], dtype=np.float64)


def schedule_savings(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, n_steps: int = 16,
                     schedules: dict | None = None, rerank_from: dict | None = None) -> dict:
    """Per named schedule (``{name: image tokens per layer}``): total decoder FLOPs (prefill,
    decode, both) and KV bytes, and the fraction saved relative to no pruning. JSON-ready.
    ``rerank_from`` ({name: layer}): schedules re-ranked at every step from that layer on, whose
    decode is :func:`rerank_decode_flops` (a saving can then be negative: it costs more)."""
    base = {
        "prefill": prefill_flops(shape, n_image, n_text, n_system).sum(),
        "decode": decode_flops(shape, n_image, n_text, n_system, n_steps).sum(),
        "kv": kv_cache_bytes(shape, n_image, n_text, n_system, n_steps).sum(),
    }
    names = list((schedules or {}).keys())
    out = {"names": names, "shape": shape.to_json(), "tokens": {"system": n_system, "image": n_image, "text": n_text},
           "n_steps": n_steps, "image_per_layer": [], "prefill_flops": [], "decode_flops": [], "total_flops": [],
           "kv_bytes": [], "prefill_saving": [], "decode_saving": [], "total_saving": [], "kv_saving": []}
    for name in names:
        sched = _schedule(shape, n_image, None, schedules[name])
        p = prefill_flops(shape, n_image, n_text, n_system, image_per_layer=sched).sum()
        if (rerank_from or {}).get(name) is not None:
            d = rerank_decode_flops(shape, n_image, n_text, n_system, n_steps, image_per_layer=sched,
                                    from_layer=int(rerank_from[name])).sum()
        else:
            d = decode_flops(shape, n_image, n_text, n_system, n_steps, image_per_layer=sched).sum()
        kv = kv_cache_bytes(shape, n_image, n_text, n_system, n_steps, image_per_layer=sched).sum()
        out["image_per_layer"].append(sched)
        out["prefill_flops"].append(float(p))
        out["decode_flops"].append(float(d))
        out["total_flops"].append(float(p + d))
        out["kv_bytes"].append(float(kv))
        out["prefill_saving"].append(float(1 - p / base["prefill"]))
        out["decode_saving"].append(float(1 - d / base["decode"]) if base["decode"] else 0.0)
        out["total_saving"].append(float(1 - (p + d) / (base["prefill"] + base["decode"])))
        out["kv_saving"].append(float(1 - kv / base["kv"]))
    return out


def truncation_savings(shape: LayerShape, n_image: int, n_text: int, n_system: int = 0, n_steps: int = 16,
                       depths=None) -> dict:
    """Per depth: total decoder FLOPs (prefill, decode, both) and KV bytes, and the fraction saved
    relative to the baseline (depth L). Plain lists, JSON-ready."""
    ks = list(range(shape.n_layers + 1)) if depths is None else [_check_depth(shape, d) for d in depths]
    sched = {k: depth_schedule(shape, n_image, k) for k in ks}
    out = schedule_savings(shape, n_image, n_text, n_system, n_steps, sched)
    del out["names"], out["image_per_layer"]
    return {"depths": ks, **out}


# ---- measurement ------------------------------------------------------------------------------------

def token_counts(lm, image, prompt: str) -> dict:
    """{"system", "image", "text"} token counts of a prompt (tokens between image blocks count as text)."""
    from ..capture import image_positions, prepare_inputs

    inputs, _, _ = prepare_inputs(lm, image, prompt)
    ids = inputs["input_ids"]
    pos = image_positions(lm, ids)
    n = int(ids.shape[1])
    s = int(pos[0]) if len(pos) else 0
    return {"system": s, "image": int(len(pos)), "text": n - s - int(len(pos))}


def time_weighted(prefill_share: float, prefill_saving: float, decode_saving: float) -> float:
    """The FLOP savings of prefill and decoding weighted by the share of the baseline's measured time each
    takes (``prefill_share``; decoding the rest): what the theory predicts for latency where a decoding
    step costs its weight reads, not its FLOPs."""
    return float(prefill_share * prefill_saving + (1 - prefill_share) * decode_saving)


def timed_generate(lm, inputs, img_pos, n_new: int, ivs) -> list[float]:
    """Seconds from the start of one greedy ``generate`` of exactly ``n_new`` tokens through the lens
    (``ivs`` applied, nothing recorded) to each token it chose: ``[0]`` is the prefill (the first
    token), ``[-1]`` the end of the run. One run gives both phases, so the decoding time is a
    difference inside one run, never of two runs. On a GPU every stamp waits for the device."""
    import torch

    from .. import generation
    from ..lens import Lens, Plan
    from ..video import video_slots

    plan = Plan.build(img_pos, lm.n_layers, int(inputs["input_ids"].shape[1]), interventions=ivs,
                      frames=video_slots(inputs))
    cuda = lm.device.type == "cuda"
    stamps: list[float] = []

    def stamp(done, total):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), Lens.for_model(lm, plan):
        out = generation.greedy_generate(lm, inputs, n_new, on_step=stamp, min_new_tokens=n_new)
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    made = int(out.sequences.shape[1] - inputs["input_ids"].shape[1])
    if made != n_new or len(stamps) != n_new:
        raise RuntimeError(f"a timed generation made {made} tokens ({len(stamps)} stamped), {n_new} were asked for")
    return [t - t0 for t in stamps[:-1]] + [end - t0]


def measure_latency(lm, image, prompt: str, depths, *, n_steps: int = 8, repeats: int = 3,
                    keep_samples: bool = False) -> dict:
    """Median wall time of prefill and of ``n_steps`` decode forwards, per depth, for
    ``Truncate(k, "remove")`` (depth L: no truncation), interleaved across depths.

    Each repeat is one ``generate`` of ``n_steps + 1`` tokens (the stop token held back, so every
    run makes them all): prefill = the time to its first token, total = the whole run, decode =
    total - prefill of the same run. No recording (hidden states, attention) is done.
    ``keep_samples`` adds every repeat's seconds under ``"samples"`` ({prefill, total}: [depth][repeat]).
    """
    from ..interventions import Truncate

    L = lm.n_layers
    ks = [int(k) for k in depths]
    out = measure_methods_latency(lm, image, prompt, {k: ([] if k == L else [Truncate(k, "remove")]) for k in ks},
                                  n_steps=n_steps, repeats=repeats, keep_samples=keep_samples)
    out["depths"] = out.pop("methods")
    return out


def measure_methods_latency(lm, image, prompt: str, methods: dict, *, n_steps: int = 8, repeats: int = 3,
                            keep_samples: bool = False, images: dict | None = None) -> dict:
    """:func:`measure_latency` for any interventions: ``methods`` maps a key to a list of
    interventions (``[]``: the baseline through the same lens); interleaved across methods.
    ``images`` ({key: image}): a method that runs on its own input (a downsampled image)."""
    from ..capture import image_positions, prepare_inputs

    keys = list(methods)
    by_image, prepared = {}, {}
    for k in keys:
        img = (images or {}).get(k, image)
        if id(img) not in by_image:
            inputs, _, _ = prepare_inputs(lm, img, prompt)
            by_image[id(img)] = (inputs, image_positions(lm, inputs["input_ids"]))
        prepared[k] = by_image[id(img)]
    runs = {k: [] for k in keys}
    for k in keys:  # warm-up
        timed_generate(lm, *prepared[k], 2, methods[k])
    for _ in range(repeats):
        for k in keys:
            runs[k].append(timed_generate(lm, *prepared[k], n_steps + 1, methods[k]))
    out = {"methods": keys, "n_steps": n_steps, "repeats": repeats, "prefill_s": [], "decode_s": [], "total_s": []}
    for k in keys:
        out["prefill_s"].append(statistics.median(r[0] for r in runs[k]))
        out["decode_s"].append(statistics.median(r[-1] - r[0] for r in runs[k]))
        out["total_s"].append(statistics.median(r[-1] for r in runs[k]))
    if keep_samples:
        out["samples"] = {"prefill": [[r[0] for r in runs[k]] for k in keys],
                          "total": [[r[-1] for r in runs[k]] for k in keys],
                          "steps": [[[b - a for a, b in zip(r, r[1:])] for r in runs[k]] for k in keys]}
    return out


def compute_tradeoff(lm, image, prompt: str, depths=None, *, n_steps: int = 8, repeats: int = 3, measure: bool = True) -> dict:
    """Theoretical savings per depth next to measured latency savings (``measure=False``: theory only).
    Measured, it also holds ``time_weighted_saving``: the FLOP savings of prefill and decoding weighted
    by the share of the baseline's measured time each takes (``prefill_time_share``) -- what the
    theory predicts for latency where a decoding step costs its weight reads, not its FLOPs."""
    L = lm.n_layers
    ks = list(range(L + 1)) if depths is None else sorted({int(k) for k in depths} | {L})
    shape = LayerShape.from_model(lm)
    c = token_counts(lm, image, prompt)
    out = truncation_savings(shape, c["image"], c["text"], c["system"], n_steps, ks)
    out["model"] = lm.name
    if measure:
        m = measure_latency(lm, image, prompt, ks, n_steps=n_steps, repeats=repeats)
        b = ks.index(L)
        out["measured"] = m
        for key in ("prefill", "decode", "total"):
            base = m[f"{key}_s"][b]
            out[f"measured_{key}_saving"] = [float(1 - x / base) if base > 0 else 0.0 for x in m[f"{key}_s"]]
        pre, dec = m["prefill_s"][b], m["decode_s"][b]
        share = pre / (pre + dec) if pre + dec > 0 else 1.0
        out["prefill_time_share"] = float(share)
        out["time_weighted_saving"] = [time_weighted(share, p, d) for p, d in zip(out["prefill_saving"],
                                                                                  out["decode_saving"])]
    return out
