"""Token pruning: theoretical decoder-FLOP savings vs measured latency, and what the ranking costs.

FastV (K=2, keep 50 % and 25 %) and PyramidDrop (layers L/4, L/2, 3L/4 at 0.5 / 0.25 / 0.125) with
``mode="remove"`` on the mid-size random LLaVA (12 x 768, 576 image tokens), timed through the
lens next to the baseline (the same lens, no pruning), interleaved, minimum over repeats.

Targets: measured prefill+decode saving >= 0.8 x the theoretical one (FastV K=2 keep 50 %); the
ranking (``observe_attention``: one query row's softmax over the keys of one layer, plus the
sort) costs <= 5 % of the prefill.

    python benchmarks/bench_pruning.py
"""
from __future__ import annotations

import argparse
import sys
import time
from statistics import median
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._report import write_section  # noqa: E402
from benchmarks.bench_capture import PRESETS, PROMPT, build, image  # noqa: E402
from vlmlens.interventions import FastV, PyramidDrop  # noqa: E402

SPENT = {"rank": 0.0}


@dataclass(frozen=True, init=False)
class _TimedFastV(FastV):
    """FastV whose ranking is timed (the same ranking: the parent's method, wrapped)."""

    def observe_attention(self, layer, view, ctx):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:                  # GPU work is asynchronous: time the ranking's kernels, not their launch
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        super().observe_attention(layer, view, ctx)
        if cuda:
            torch.cuda.synchronize()
        SPENT["rank"] += time.perf_counter() - t0


class LayerClock:
    """Wall time of each decoder layer's forward (pre and post hooks on the layers, removed on exit);
    ``take()`` hands over the first forward's times in ms since the last take (the prefill's)."""

    def __init__(self, lm):
        self.layers = lm.model.get_decoder().layers
        self.times, self._t0, self._handles = {}, {}, []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _pre(self, i):
        def hook(module, args):
            self._t0[i] = time.perf_counter()
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.times.setdefault(i, []).append(1000 * (time.perf_counter() - self._t0[i]))
        return hook

    def take(self) -> list[float]:
        out = [self.times[i][0] for i in range(len(self.layers))]
        self.times = {}
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8, help="decode forwards after the prefill")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from vlmlens.analysis.compute import (LayerShape, measure_methods_latency, schedule_savings, time_weighted,
                                          token_counts)

    lm = build(a.preset, a.device, getattr(torch, a.dtype))
    L = lm.n_layers
    stages = [L // 4, L // 2, (3 * L) // 4]
    methods = {"baseline": [], "FastV K=2 keep 50%": [FastV(2, 0.5)], "FastV K=2 keep 25%": [FastV(2, 0.25)],
               f"PyramidDrop {'/'.join(map(str, stages))}": [PyramidDrop(stages, [0.5, 0.25, 0.125])]}
    c = token_counts(lm, image(), PROMPT)
    sched = {k: (ivs[0].image_per_layer(c["image"], L) if ivs else [c["image"]] * L) for k, ivs in methods.items()}
    theory = schedule_savings(LayerShape.from_model(lm), c["image"], c["text"], c["system"], a.steps, sched)
    m = measure_methods_latency(lm, image(), PROMPT, methods, n_steps=a.steps, repeats=a.repeats, keep_samples=True)

    # what the ranking costs: FastV K=2 keep 50 % prefills with the ranking timed inside
    from vlmlens.analysis.compute import timed_generate
    from vlmlens.capture import image_positions, prepare_inputs

    inputs, _, _ = prepare_inputs(lm, image(), PROMPT)
    pos = image_positions(lm, inputs["input_ids"])
    rank, prefill = [], []
    layer_ms = {"baseline": [], "FastV": []}       # each decoder layer's prefill time, per run
    with LayerClock(lm) as clock:
        for _ in range(a.repeats):
            SPENT["rank"] = 0.0
            prefill.append(timed_generate(lm, inputs, pos, 1, [_TimedFastV(2, 0.5)])[-1])
            rank.append(SPENT["rank"])
            layer_ms["FastV"].append(clock.take())
            timed_generate(lm, inputs, pos, 1, [])
            layer_ms["baseline"].append(clock.take())
    per_layer = {k: [median(r[l] for r in v) for l in range(L)] for k, v in layer_ms.items()}
    kept_rows = c["system"] + c["image"] // 2 + c["text"]
    full_rows = c["system"] + c["image"] + c["text"]
    pruned_share = median(per_layer["FastV"][l] / per_layer["baseline"][l] for l in range(2, L))

    names = list(methods)
    base_tot = min(m["samples"]["total"][0])
    base_pre = min(m["samples"]["prefill"][0])

    def decode(i):      # seconds of decoding: the whole run less its own prefill, the fastest run
        return min(t - p for p, t in zip(m["samples"]["prefill"][i], m["samples"]["total"][i]))

    def steps(i):       # every decoding step of every run (the last, which also ends generate, left out)
        return [x for r in m["samples"]["steps"][i] for x in r[:-1]]

    base_dec = decode(0)
    p = PRESETS[a.preset]
    lines = [
        f"Model: random LLaVA, {p['layers']} layers x d_model {p['d']}, tokens: system {c['system']} + image {c['image']}"
        f" + text {c['text']}, {a.steps} decode steps, {a.device} {a.dtype}, torch {torch.__version__},"
        f" {torch.get_num_threads()} threads; {a.repeats} interleaved repeats, min.",
        "",
        "| method (remove) | image rows per layer | theory: prefill | measured: prefill | measured / theory (prefill) |"
        " theory: prefill+decode | measured: prefill+decode | measured / theory | KV bytes saved |"
        " prefill (s) | decode per step (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = True
    for i, name in enumerate(names):
        th = theory["total_saving"][i]
        meas = 1 - min(m["samples"]["total"][i]) / base_tot
        mpre = 1 - min(m["samples"]["prefill"][i]) / base_pre
        ratio = meas / th if th > 0 else float("nan")
        if name == "FastV K=2 keep 50%":
            ok &= ratio >= 0.8
            fastv = (th, meas, ratio)
        rows = sched[name]
        rows_txt = f"{rows[0]}" if len(set(rows)) == 1 else " → ".join(
            f"{r} from {l}" for l, r in enumerate(rows) if l == 0 or rows[l - 1] != r)
        tpre = theory["prefill_saving"][i]
        pre_s = min(m["samples"]["prefill"][i])
        dec_ms = 1000 * decode(i) / a.steps
        if name == "FastV K=2 keep 50%":
            fastv_pre = (tpre, mpre)
            # each phase's FLOP saving weighted by the share of time it takes in the baseline: what the
            # theory predicts once a decode step is priced at its measured cost instead of its FLOPs
            dec_saving = 1 - decode(i) / base_dec if base_dec else 0.0
            step_ms = (1000 * median(steps(0)), 1000 * median(steps(i)), len(steps(i)))
            weighted = time_weighted(base_pre / (base_pre + base_dec), tpre, theory["decode_saving"][i])
            fastv_time = (theory["decode_saving"][i], dec_saving, weighted, meas)
        lines.append(f"| {name} | {rows_txt} | {tpre:.1%} | {mpre:.1%} | {'–' if tpre <= 0 else f'{mpre / tpre:.2f}'} |"
                     f" {th:.1%} | {meas:.1%} | {'–' if th <= 0 else f'{ratio:.2f}'} | {theory['kv_saving'][i]:.1%} |"
                     f" {pre_s:.2f} | {dec_ms:.0f} |")
    share = min(r / t for r, t in zip(rank, prefill))
    lines += [
        "",
        f"- FastV K=2 keep 50 %: measured prefill+decode saving {fastv[1]:.1%} vs theory {fastv[0]:.1%} = **{fastv[2]:.2f}x**"
        f" (target >= 0.8: **{'met' if ok else 'NOT met'}**); prefill alone {fastv_pre[1]:.1%} vs {fastv_pre[0]:.1%} ="
        f" **{fastv_pre[1] / fastv_pre[0]:.2f}x**",
        "- why the two differ: the FLOP count makes a decode step ~1/600 of a 600-token prefill, but on this"
        f" {'GPU' if lm.device.type == 'cuda' else 'CPU'} a step"
        " costs what reading every weight costs (memory-bound, see the last column), whatever the number of keys;"
        " pruning shortens the KV cache, which is a small part of that. The theory is right about FLOPs and the prefill;"
        " it over-promises end-to-end latency wherever decoding is weight-bound.",
        f"- FastV K=2 keep 50 %, decode alone: theory {fastv_time[0]:.1%} of a step's FLOPs, measured {fastv_time[1]:.1%}"
        f" of its time; the theory with each phase weighted by its measured share of the baseline's time predicts"
        f" {fastv_time[2]:.1%} end to end, measured {fastv_time[3]:.1%} = **{fastv_time[3] / fastv_time[2]:.2f}x** of it"
        " (what is left for anything else in the pruned run to cost)",
        f"- a decoding step, timed one by one inside each run ({step_ms[2]} steps each): baseline median"
        f" {step_ms[0]:.1f} ms, FastV K=2 keep 50 % {step_ms[1]:.1f} ms (**{step_ms[1] / step_ms[0]:.2f}x**)"
        + (": the pruned decoding costs no more than the unpruned one (within 5 %)" if step_ms[1] <= 1.05 * step_ms[0]
           else f": the pruned decoding costs {step_ms[1] / step_ms[0] - 1:.0%} more than the unpruned one"),
        f"- ranking cost (time inside FastV's observe_attention / prefill time, min over {a.repeats}): **{share:.2%}**"
        f" of the prefill (target <= 5 %: **{'met' if share <= 0.05 else 'NOT met'}**); no eager attention, no"
        " [head, n, n] matrix: one query row against the keys of one layer",
        f"- the prefill layer by layer (median of {a.repeats} FastV K=2 keep 50 % runs, next to the baseline): a pruned layer"
        f" (2..{L - 1}) takes **{pruned_share:.2f}x** a full one's time, for {kept_rows} of {full_rows} rows"
        f" ({kept_rows / full_rows:.2f}); layers 0-1: {per_layer['FastV'][0]:.0f} and {per_layer['FastV'][1]:.0f} ms against"
        f" {per_layer['baseline'][0]:.0f} and {per_layer['baseline'][1]:.0f} ms (the ranking runs in layer 1)",
        "- theory counts decoder-layer FLOPs only; the vision tower, the embedding and the LM head are not pruned and"
        " dilute the measured saving.",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section(f"bench_pruning_{a.preset}_{a.device}", f"Token pruning: theory vs measured ({a.preset}, {a.device})",
                      text)


if __name__ == "__main__":
    main()
