"""vlmlens beside what users pick instead, side by side in one process.

The task: an image + prompt, prefill + N greedy tokens, keeping every decoder layer's hidden
states and the last prompt token's attention (per head) to the image tokens. Variants:

* ``plain``     -- SDPA ``generate``, nothing kept (the baseline every ratio divides by);
* ``plain, one token more`` -- the same with N + 1 tokens: the forwards ``vl.capture`` runs (it
  feeds the last generated token back once, so the Run holds that token's states as well);
* ``vlmlens``   -- ``vl.capture`` as the dashboard runs it (SDPA kept; float32 storage, as the
  peers keep): hidden states, every row's attention share and map, the last prompt token's
  per-head maps and the image tokens' value contributions;
* ``vlmlens, task only`` -- the same without the contributions (what the task asks for);
* ``hf-eager``  -- eager attention + ``output_attentions`` / ``output_hidden_states``;
* ``nnsight``   -- nnsight's ``TransformersModel.generate``, saving each layer's output and its
  attention weights at every step (eager attention: under SDPA there are no weights to save);
* ``transformer-lens`` -- TransformerLens's bridge (booted once from the model object, with its config
  and processor saved to a folder, since it boots by name): its ``generate`` for the tokens, then
  ``run_with_cache`` over prompt + tokens for the states and attention patterns (eager).

Every timed call starts from the image and the prompt (the processor runs in every variant).
Time: median of interleaved repeats (wall clock, and process CPU time, which a busy host's
stolen time does not inflate). Peak memory: each variant in a fresh child process, resident
memory sampled during the call (blocks of 64 KiB or more mapped and unmapped one by one, so that
what was freed before the call does not hide what the call allocates). Correctness:
max |difference| against vlmlens of the hidden states at the positions both keep and of the
last prompt token's attention to the image, and whether the generated tokens are the same.
Hidden states are compared at the positions whose inputs agree (up to the first token a
variant generated differently). User lines: the lines of each variant's function below -- what a
user writes. TransformerLens's row is timed in a process of its own, against plain generate on
a second, untouched instance of the model, since its bridge wraps the model's modules in place. HF's
``hidden_states`` end with the final norm's output instead of the last layer's: its hidden
states are compared up to the layer before the last.

The peers are not in the project's requirements. Install them into an environment of their own
that reuses this one's torch and transformers and cannot replace them (a constraint no wheel
meets keeps torchvision out; TransformerLens 4.3 runs ``pip install torchvision`` when it cannot
load a processor by name, which offline is always, and that pip then refuses too):

    python -m venv --system-site-packages .venv-peers
    printf 'torch==2.13.0\\ntransformers==5.25.0\\ntorchvision==0.0.0\\n' > .venv-peers/constraints.txt
    PIP_CONSTRAINT=.venv-peers/constraints.txt .venv-peers/bin/pip install nnsight==0.8.1 transformer-lens==4.3.0
    PIP_CONSTRAINT=.venv-peers/constraints.txt .venv-peers/bin/python benchmarks/bench_peers.py --model tiny-shapes
    PIP_CONSTRAINT=.venv-peers/constraints.txt .venv-peers/bin/python benchmarks/bench_peers.py --model mid --image-tokens 576

Without the peers installed the script measures plain, vlmlens and hf-eager and says which
peers it did not find.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OTEL_SDK_DISABLED", "true")      # nnsight ships an exporter: nothing leaves this machine
os.environ.setdefault("PIP_NO_INDEX", "1")              # a peer's run-time pip install finds nothing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._report import write_section  # noqa: E402

PROMPT = "Describe the image in detail and tell me what is in the middle of the picture."
PHOTO = Path(__file__).resolve().parents[1] / "assets" / "examples" / "shapes_00.png"


def load(model: str, image_tokens: int):
    """(LoadedModel, image) for the benchmark's model; generation runs to its full length."""
    import vlmlens as vl

    if model == "mid":
        from benchmarks.bench_capture import build, image

        side = int(round(image_tokens ** 0.5))
        if side * side != image_tokens:
            raise SystemExit(f"--image-tokens must be a square number, got {image_tokens}")
        lm = build("mid", "cpu", torch.float32, side=side)
        img = image(side)
    else:
        from PIL import Image

        lm = vl.load_model(model, device="cpu", dtype="float32")
        img = Image.open(PHOTO).convert("RGB")
    lm.model.generation_config.eos_token_id = None      # every variant generates exactly N tokens
    return lm, img


def chat_inputs(lm, image) -> dict:
    """The prompt through the model's chat template and its processor (the same in every variant;
    ``vl.capture`` does it itself, so the user lines below leave it out everywhere)."""
    return lm.arch.build_inputs(lm.processor, image, PROMPT)


def decoder_path(lm) -> str:
    """The dotted name of the language model's decoder layers (``model.language_model.layers``)."""
    layers = lm.model.get_decoder().layers
    return next(name for name, m in lm.model.named_modules() if m is layers)


# -- the variants: what a user writes ---------------------------------------------------------------

def run_plain(lm, image, n):
    inputs = chat_inputs(lm, image)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return {"ids": out[0].tolist()}


def run_plain_one_more(lm, image, n):
    inputs = chat_inputs(lm, image)
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=n + 1, do_sample=False)
    return {"ids": out[0, :-1].tolist()}


def run_vlmlens(lm, image, n):
    import vlmlens as vl

    run = vl.capture(lm, image, PROMPT, max_new_tokens=n, hidden_dtype="float32")
    return {"ids": run.token_ids, "hidden": run.hidden_states[1:], "attention": run.arrays["attention_head_maps"]}


def run_vlmlens_task(lm, image, n):
    import vlmlens as vl

    run = vl.capture(lm, image, PROMPT, max_new_tokens=n, hidden_dtype="float32", record_contrib=False)
    return {"ids": run.token_ids, "hidden": run.hidden_states[1:], "attention": run.arrays["attention_head_maps"]}


def run_hf_eager(lm, image, n):
    inputs = chat_inputs(lm, image)
    image_pos = (inputs["input_ids"][0] == lm.arch.image_token_id(lm.model, lm.processor)).nonzero()[:, 0]
    with torch.no_grad():
        out = lm.model.generate(**inputs, max_new_tokens=n, do_sample=False, output_attentions=True,
                                output_hidden_states=True, return_dict_in_generate=True)
    # the last entry is the final norm's output, not the last layer's: compared up to the layer before
    hidden = torch.cat([torch.stack(step[1:-1]) for step in out.hidden_states], dim=2)[:, 0]
    attention = torch.stack([a[0, :, -1, image_pos] for a in out.attentions[0]])
    return {"ids": out.sequences[0].tolist(), "hidden": hidden.numpy(), "attention": attention.numpy()}


def run_nnsight(lm, image, n):
    import nnsight

    model = nnsight.TransformersModel(lm.model, processor=lm.processor, tokenizer=lm.processor.tokenizer,
                                      task="image-text-to-text")
    inputs = chat_inputs(lm, image)
    image_pos = (inputs["input_ids"][0] == lm.arch.image_token_id(lm.model, lm.processor)).nonzero()[:, 0]
    layers = model
    for name in decoder_path(lm).split("."):
        layers = getattr(layers, name)
    with model.generate(**inputs, max_new_tokens=n, do_sample=False) as tracer:
        steps = nnsight.save(list())
        for _ in tracer.iter[:n]:
            step = []
            for layer in layers:
                step.append((layer.self_attn.output[1], layer.output))
            steps.append(step)
        ids = tracer.result.save()
    hidden = torch.cat([torch.stack([h for _, h in s]) for s in steps], dim=2)[:, 0]
    attention = torch.stack([a[0, :, -1, image_pos] for a, _ in steps[0]])
    return {"ids": ids[0].tolist(), "hidden": hidden.numpy(), "attention": attention.numpy()}


_BRIDGES: dict = {}     # one TransformerLens bridge per model, booted in the warm-up call (as a user boots once)


def run_transformer_lens(lm, image, n):
    from transformer_lens.model_bridge import TransformerBridge

    if id(lm) not in _BRIDGES:              # its bridge boots by name: the config and processor as files
        from transformers import AutoTokenizer

        folder, config = tempfile.mkdtemp(), copy.deepcopy(lm.model.config)
        # it reads the class from the model's own config (a model built from a config has none written there)
        lm.model.config.architectures = config.architectures = config.architectures or [type(lm.model).__name__]
        config.save_pretrained(folder)
        lm.processor.save_pretrained(folder)
        # a tokenizer read from files: the bridge reopens it by the name it was loaded from
        _BRIDGES[id(lm)] = TransformerBridge.boot_transformers(folder, hf_model=lm.model,
                                                               tokenizer=AutoTokenizer.from_pretrained(folder))
    bridge = _BRIDGES[id(lm)]
    inputs = chat_inputs(lm, image)
    image_pos = (inputs["input_ids"][0] == lm.arch.image_token_id(lm.model, lm.processor)).nonzero()[:, 0]
    ids = bridge.generate(inputs["input_ids"], max_new_tokens=n, do_sample=False, pixel_values=inputs["pixel_values"],
                          attention_mask=inputs["attention_mask"], verbose=False, return_type="tokens")
    names = [f"blocks.{i}.{h}" for i in range(lm.n_layers) for h in ("hook_resid_post", "attn.hook_pattern")]
    _, cache = bridge.run_with_cache(ids[:, :-1], pixel_values=inputs["pixel_values"], names_filter=names)
    hidden = torch.stack([cache[f"blocks.{i}.hook_resid_post"][0] for i in range(lm.n_layers)])
    last = inputs["input_ids"].shape[1] - 1
    attention = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, last, image_pos] for i in range(lm.n_layers)])
    return {"ids": ids[0].tolist(), "hidden": hidden.numpy(), "attention": attention.numpy()}


VARIANTS = {"plain": run_plain, "plain, one token more": run_plain_one_more, "vlmlens": run_vlmlens,
            "vlmlens, task only": run_vlmlens_task, "hf-eager": run_hf_eager, "nnsight": run_nnsight,
            "transformer-lens": run_transformer_lens}
EAGER = {"hf-eager", "nnsight", "transformer-lens"}
# variants that change the model they run on (TransformerLens's bridge wraps its modules in place):
# measured in a process of their own, beside plain generate on a second, untouched instance
ISOLATED = {"transformer-lens"}
PEERS = {"nnsight": "nnsight", "transformer-lens": "transformer_lens"}


def user_lines(fn) -> int:
    """Non-blank lines of a variant's body (its ``def`` line and its return of the results excluded)."""
    body = inspect.getsource(fn).splitlines()[1:]
    return sum(1 for line in body if line.strip() and not line.strip().startswith("return"))


def available() -> tuple[list, dict]:
    names, missing = [], {}
    for name in VARIANTS:
        module = PEERS.get(name)
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                missing[name] = "not installed (see this script's instructions)"
                continue
        names.append(name)
    return names, missing


def call(lm, name, image, n):
    if name in EAGER:
        lm.model.set_attn_implementation("eager")
    try:
        return VARIANTS[name](lm, image, n)
    finally:
        if name in EAGER:
            lm.model.set_attn_implementation("sdpa")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a) -> None:
    """One variant's peak resident memory above what the process held just before the call, sampled
    every 2 ms during the call (a lifetime high-water mark would also count the warm-up's peak)."""
    import threading

    lm, image = load(a.model, a.image_tokens)
    call(lm, "plain", image, 1)                            # warm up
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        call(lm, a.child, image, a.new_tokens)
    finally:
        done.set()
        t.join()
    print(json.dumps({"peak": max(peak[0], _rss()) - before}))


def isolated_child(a) -> None:
    """Time variant ``a.isolated`` beside plain generate, each on its own instance of the model; its
    differences against vlmlens on the untouched one."""
    lm, image = load(a.model, a.image_tokens)
    other, _ = load(a.model, a.image_tokens)
    if other.model is lm.model:
        raise SystemExit("the two instances are one model: the isolated variant would change the baseline")
    ref = call(lm, "vlmlens", image, a.new_tokens)
    got = call(other, a.isolated, image, a.new_tokens)          # also the warm-up
    call(lm, "plain", image, a.new_tokens)
    runs = {"plain": (lm, "plain"), "variant": (other, a.isolated)}
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(a.repeats):
        for key, (model, name) in runs.items():
            w, c = time.perf_counter(), time.process_time()
            call(model, name, image, a.new_tokens)
            wall[key].append(time.perf_counter() - w)
            cpu[key].append(time.process_time() - c)
    dh, da, same = differences(ref, got)
    print(json.dumps({"wall": {k: statistics.median(v) for k, v in wall.items()},
                      "cpu": {k: statistics.median(v) for k, v in cpu.items()}, "dh": dh, "da": da, "same": same}))


def differences(ref: dict, got: dict) -> tuple:
    if "hidden" not in got:
        return None, None, ref["ids"] == got["ids"]
    layers, n = (min(ref["hidden"].shape[i], got["hidden"].shape[i]) for i in (0, 1))
    # where the tokens part, so do the inputs: states are compared up to the first different token
    n = min([n] + [i for i, (x, y) in enumerate(zip(ref["ids"], got["ids"])) if x != y][:1])
    dh = float(np.abs(np.asarray(ref["hidden"])[:layers, :n] - got["hidden"][:layers, :n]).max())
    da = float(np.abs(np.asarray(ref["attention"]) - got["attention"]).max())
    return dh, da, ref["ids"] == got["ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-shapes", choices=["tiny-shapes", "smol-shapes", "mid"])
    ap.add_argument("--image-tokens", type=int, default=576, help="mid only: 576 (24 x 24) or 2304 (48 x 48)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--isolated", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    if a.isolated:
        return isolated_child(a)
    names, missing = available()
    inline = [name for name in names if name not in ISOLATED]
    lm, image = load(a.model, a.image_tokens)
    results = {name: call(lm, name, image, a.new_tokens) for name in inline}     # also the warm-up
    wall = {name: [] for name in inline}
    cpu = {name: [] for name in inline}
    for _ in range(a.repeats):
        for name in inline:
            w, c = time.perf_counter(), time.process_time()
            call(lm, name, image, a.new_tokens)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    own = {}            # isolated variants: (their time / their process's plain time, differences)
    for name in [n for n in names if n in ISOLATED]:
        cmd = [sys.executable, __file__, "--model", a.model, "--image-tokens", str(a.image_tokens),
               "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--isolated", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            missing[name] = f"failed: {out.stderr.strip().splitlines()[-1][:200] if out.stderr.strip() else out.returncode}"
            names.remove(name)
            continue
        own[name] = json.loads(out.stdout.strip().splitlines()[-1])
    mem = {}
    for name in names:
        cmd = [sys.executable, __file__, "--model", a.model, "--image-tokens", str(a.image_tokens),
               "--new-tokens", str(a.new_tokens), "--child", name]
        # large blocks straight from (and back to) the system: resident memory then follows what is alive
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak"] if out.returncode == 0 else None
    n_img = int(np.asarray(results["vlmlens"]["attention"]).shape[-1])
    where = f"{a.model}, {n_img} image tokens" if a.model != "mid" else f"mid LLaVA 12 x 768, {n_img} image tokens"
    lines = [f"{where}; prefill + {a.new_tokens} greedy tokens; cpu float32, torch {torch.__version__},"
             f" {torch.get_num_threads()} threads; median of {a.repeats} interleaved repeats.", "",
             "| variant | wall (s) | wall / plain | CPU (s) | CPU / plain | peak above start (MiB) | peak / plain |"
             " max abs diff: hidden | max abs diff: attention | same tokens | user lines |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    w0, c0, m0 = statistics.median(wall["plain"]), statistics.median(cpu["plain"]), mem.get("plain")
    for name in names:
        m = mem[name]
        if name in own:             # ratios to the plain generate timed beside it in its own process
            o = own[name]
            w, c = o["wall"]["variant"], o["cpu"]["variant"]
            w0, c0 = o["wall"]["plain"], o["cpu"]["plain"]
            dh, da, same = o["dh"], o["da"], o["same"]
        else:
            w0, c0 = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            dh, da, same = differences(results["vlmlens"], results[name])
        fmt = lambda v: "–" if v is None else f"{v:.1e}"          # noqa: E731
        ratio = "–" if m is None or not m0 or m0 < 16 * 2**20 else f"{m / m0:.2f}"   # not of a few MiB's noise
        lines.append(f"| {name} | {w:.3f} | {w / w0:.2f} | {c:.3f} | {c / c0:.2f} | "
                     f"{'–' if m is None else f'{m / 2**20:.1f}'} | {ratio} |"
                     f" {fmt(dh)} | {fmt(da)} | {'yes' if same else 'NO'} | {user_lines(VARIANTS[name])} |")
    for name, why in missing.items():
        lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | {why} |")
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        key = f"bench_peers_{a.model}_{n_img}".replace("-", "_")
        write_section(key, f"Side by side with peers ({where})", text)


if __name__ == "__main__":
    main()
