"""Test-split evaluation of a tiny-shapes checkpoint through the plain HF path.

Loads with ``AutoProcessor`` / ``LlavaForConditionalGeneration.from_pretrained``,
builds inputs with ``processor.apply_chat_template`` + ``processor(...)`` and
decodes greedy ``generate`` output -- exactly what the dashboard does.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict

from .scenes import blank_image, make_scene
from .tasks import FAMILIES, REASONING_KINDS, SINGLE_KINDS, Example, final_answer, split_examples
from .tokenizer import chat_prompt

MAX_NEW_TOKENS = {"single": 4, "caption": 48, "reasoning": 48}


def load(model_dir: str, threads: int | None = None):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if threads:
        torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    return model, processor


def generate(model, processor, images, prompts, max_new_tokens: int = 48, batch_size: int = 50) -> list[str]:
    """Greedy answers for (image, prompt) pairs.  Pairs are grouped by prompt length so
    that no batch needs padding (results are identical to one-at-a-time generation)."""
    import torch

    texts = [processor.apply_chat_template(chat_prompt(p), add_generation_prompt=True) for p in prompts]
    lengths = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    groups = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    out: list[str | None] = [None] * len(texts)
    for idx in groups.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k: k + batch_size]
            inputs = processor(images=[images[i] for i in chunk], text=[texts[i] for i in chunk],
                               return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = gen[:, inputs["input_ids"].shape[1]:]
            for i, seq in zip(chunk, new):
                out[i] = processor.tokenizer.decode(seq, skip_special_tokens=True).strip()
    return out  # type: ignore[return-value]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def token_f1(pred: str, gold: str) -> float:
    p, g = _norm(pred).split(), _norm(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def score(family: str, examples: list[Example], preds: list[str]) -> dict:
    n = len(examples)
    if family == "single":
        ok = [_norm(p) == e.answer for e, p in zip(examples, preds)]
        per = defaultdict(list)
        for e, o in zip(examples, ok):
            per[e.kind].append(o)
        return {"n": n, "accuracy": sum(ok) / n,
                "per_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}}
    if family == "caption":
        return {"n": n, "exact_match": sum(_norm(p) == _norm(e.answer) for e, p in zip(examples, preds)) / n,
                "token_f1": sum(token_f1(p, e.answer) for e, p in zip(examples, preds)) / n}
    ok = [final_answer(p) == e.final_answer for e, p in zip(examples, preds)]
    per = defaultdict(list)
    for e, o in zip(examples, ok):
        per[e.kind].append(o)
    return {"n": n, "final_answer_accuracy": sum(ok) / n,
            "trace_exact_match": sum(_norm(p) == _norm(e.answer) for e, p in zip(examples, preds)) / n,
            "per_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}}


def majority_baseline(examples: list[Example]) -> float:
    """Accuracy of always giving the most common answer of each question kind
    (what a model that ignores the image could at best reach per kind)."""
    by_kind = defaultdict(list)
    for e in examples:
        by_kind[e.kind].append(e.final_answer)
    hits = sum(Counter(v).most_common(1)[0][1] for v in by_kind.values())
    return hits / len(examples)


def evaluate(model_dir: str, n: int = 300, batch_size: int = 50, threads: int | None = 2,
             blind: bool = True, families=FAMILIES) -> dict:
    model, processor = load(model_dir, threads)
    res: dict = {"model": model_dir, "n_per_family": n, "split": "test (seeds 0..%d)" % (n - 1)}
    t0 = time.time()
    for fam in families:
        exs = split_examples(fam, n)
        preds = generate(model, processor, [e.scene.image for e in exs], [e.prompt for e in exs],
                         MAX_NEW_TOKENS[fam], batch_size)
        res[fam] = score(fam, exs, preds)
        res[fam]["samples"] = [{"seed": e.seed, "prompt": e.prompt, "answer": e.answer, "pred": p}
                               for e, p in list(zip(exs, preds))[:3]]
        if fam != "caption":
            res[fam]["majority_baseline"] = majority_baseline(exs)
        if blind:
            blank = blank_image()
            other = [make_scene(e.seed + 50_000).image for e in exs]  # different test-split scenes
            for name, imgs in (("blank_image", [blank] * n), ("other_scene", other)):
                p2 = generate(model, processor, imgs, [e.prompt for e in exs], MAX_NEW_TOKENS[fam], batch_size)
                s2 = score(fam, exs, p2)
                s2.pop("per_kind", None)
                res[fam][name] = s2
    res["eval_time_s"] = round(time.time() - t0, 1)
    return res


def format_report(res: dict) -> str:
    lines = [f"model: {res['model']}   test examples per family: {res['n_per_family']}"]
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    if "single" in res:
        s = res["single"]
        lines.append(f"single-token accuracy      {pct(s['accuracy'])}   (majority baseline {pct(s['majority_baseline'])})")
        lines.append("   per kind: " + ", ".join(f"{k} {pct(v)}" for k, v in s["per_kind"].items()))
    if "caption" in res:
        c = res["caption"]
        lines.append(f"caption exact match        {pct(c['exact_match'])}   token F1 {pct(c['token_f1'])}")
    if "reasoning" in res:
        r = res["reasoning"]
        lines.append(f"reasoning final answer     {pct(r['final_answer_accuracy'])}   whole trace exact "
                     f"{pct(r['trace_exact_match'])}   (majority baseline {pct(r['majority_baseline'])})")
        lines.append("   per kind: " + ", ".join(f"{k} {pct(v)}" for k, v in r["per_kind"].items()))
    for name in ("blank_image", "other_scene"):
        if name in res.get("single", {}):
            s, c, r = res["single"][name], res["caption"][name], res["reasoning"][name]
            lines.append(f"blind [{name:11s}] single {pct(s['accuracy'])}  caption exact {pct(c['exact_match'])} "
                         f"F1 {pct(c['token_f1'])}  reasoning answer {pct(r['final_answer_accuracy'])}")
    lines.append(f"eval time {res['eval_time_s']:.0f}s")
    return "\n".join(lines)


def example_prompts(seed: int) -> dict:
    """Every applicable question kind for one scene, with ground-truth answers."""
    from .tasks import make_example

    out = {"single": [], "caption": [], "reasoning": []}
    for fam, kinds in (("single", SINGLE_KINDS), ("caption", (None,)), ("reasoning", REASONING_KINDS)):
        for k in kinds:
            try:
                e = make_example(seed, fam, kind=k)
            except ValueError:
                continue
            out[fam].append({"kind": e.kind, "prompt": e.prompt, "answer": e.answer})
    return out


def write_examples(out_dir: str, n_files: int = 10) -> list[str]:
    """Save ``n_files`` test-split scenes (first seeds giving 1,2,3,4 objects in turn)
    as native 64x64 PNGs plus ``prompts.json``.  No selection by model correctness."""
    os.makedirs(out_dir, exist_ok=True)
    entries, seed, want = [], 0, 1
    while len(entries) < n_files:
        sc = make_scene(seed)
        if len(sc.objects) == want:
            name = f"shapes_{len(entries):02d}.png"
            sc.image.save(os.path.join(out_dir, name))
            entries.append({"file": name, "seed": seed, "split": "test", "truth": sc.truth(),
                            "prompts": example_prompts(seed)})
            want = want % 4 + 1
        seed += 1
    meta = {"description": "Test-split scenes of the tiny shapes world (vlmlens.tiny.scenes.make_scene(seed)); "
                           "64x64 = the model's native input size. Prompts are the task templates the model was "
                           "trained on; answers are exact ground truth.",
            "chat_format": "<s>USER: <image> {prompt} ASSISTANT:", "examples": entries}
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return [e["file"] for e in entries]
