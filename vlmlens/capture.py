"""capture(lm, image, prompt) -> Run: one prefill + greedy generation seen through the lens."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from ._version import __version__
from .errors import InputError
from .images import load_image
from .interventions import decides_every_step, validate_all
from .generation import _eos_ids, extend_inputs, greedy_generate  # noqa: F401  (also imported from here)
from .lens import NOTHING, Lens, LensStart, Plan, Recording
from .run import Run, TokenSpans
from .video import Video, input_sha256, video_inputs, video_slots

MAX_NEW_TOKENS_LIMIT = 1024
#: longest prompt accepted, in characters (checked before tokenising; the context check below
#: is the real bound, this one keeps a pasted book from being tokenised at all)
MAX_PROMPT_CHARS = 20_000


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is empty; type a question or instruction about the image")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"prompt is not valid Unicode text: a lone surrogate {prompt[e.start]!r} at character"
                         f" {e.start}") from None
    return prompt.strip()


def unknown_words(lm, prompt: str) -> list[str]:
    """Words of ``prompt`` the tokenizer can only read as its unknown token (in order, once
    each). A small vocabulary (tiny-shapes knows 76 words) turns them into ``<unk>``, and the
    model then answers a different question than the one asked."""
    tok = lm.processor.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if unk not in ids:
        return []
    words = list(dict.fromkeys(prompt.split()))           # once each, in order; one batched tokenizer call
    return [w for w, w_ids in zip(words, tok(words, add_special_tokens=False)["input_ids"]) if unk in w_ids]


def context_limit(lm) -> int | None:
    """The most positions the language model takes (``max_position_embeddings``), if it says."""
    n = getattr(lm.text_config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(lm, n_prompt: int, n_image: int, max_new_tokens: int) -> None:
    """Refuse, before any forward, a request whose prompt + generation would not fit the model."""
    limit = context_limit(lm)
    need = int(n_prompt) + int(max_new_tokens) + 1     # capture feeds the last generated token back once
    if limit is not None and need > limit:
        raise InputError(
            f"too long for this model: the prompt is {n_prompt:,} tokens ({n_image:,} of them image tokens) and "
            f"max_new_tokens is {max_new_tokens}, {need:,} positions in all, but {lm.name} takes at most {limit:,};"
            " shorten the prompt or lower max_new_tokens")


def check_max_new_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"max_new_tokens must be an integer, got {n!r}")
    if not 0 <= int(n) <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS_LIMIT}, got {n}")
    return int(n)


def prepare_inputs(lm, image, prompt: str) -> tuple[dict, "object", str | None]:
    """Validate and build model inputs on lm's device. Returns (inputs, rgb_image, note); for a
    :class:`~vlmlens.video.Video` the image is its contact sheet (one frame per temporal slot)."""
    prompt = check_prompt(prompt)
    if isinstance(image, Video):
        inputs, rgb, note = video_inputs(lm, image, prompt)
    else:
        rgb, note = load_image(image)
        inputs = dict(lm.arch.build_inputs(lm.processor, rgb, prompt))
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(lm.device)
            if v.is_floating_point():
                v = v.to(lm.dtype)
            inputs[k] = v
    return inputs, rgb, note


def image_positions(lm, input_ids: torch.Tensor) -> np.ndarray:
    """Positions of the visual placeholder tokens: the image's, or the video's (the lens's "image" span)."""
    ids = [lm.arch.image_token_id(lm.model, lm.processor)]
    if lm.arch.video:
        ids.append(lm.arch.video_token_id(lm.model))
    ids = torch.as_tensor(ids, device=input_ids.device)
    return torch.nonzero(torch.isin(input_ids[0], ids)).flatten().cpu().numpy()


@dataclass
class Prepared:
    """One (image, prompt) pair, validated and processed once (:func:`prepare`).

    ``position_ids`` are the ids ``generate`` builds for the whole prompt (2-D for LLaVA,
    [4, 1, n] text + M-RoPE rows for Qwen2-VL) where prefix reuse is supported, else None;
    continuations slice and extend them.
    """

    model_name: str
    prompt: str
    inputs: dict
    rgb: object
    note: str | None
    image_sha: str
    n_prompt: int
    image_pos: np.ndarray
    position_ids: torch.Tensor | None
    video: Video | None = None      # the input, where it was a video (``rgb`` is then its contact sheet)

    @property
    def visual(self):
        """What to hand capture again for this input: the image, or the video."""
        return self.video if self.video is not None else self.rgb

    @property
    def n_prefix(self) -> int:
        return int(self.image_pos[-1]) + 1

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


def prepare(lm, image, prompt: str, *, position_ids: bool = False) -> Prepared:
    """Validate and process ``image`` + ``prompt`` once (raises InputError on bad input);
    ``position_ids``: also build the whole prompt's position ids (for continuations)."""
    inputs, rgb, note = prepare_inputs(lm, image, prompt)
    ids = inputs["input_ids"]
    pos = image_positions(lm, ids)
    if len(pos) == 0:
        raise InputError("the processed prompt contains no image tokens; this model's processor did not insert the image")
    pids = None
    if position_ids and int(pos[-1]) + 1 < ids.shape[1]:
        with torch.no_grad():
            pids = lm.model._prepare_position_ids_for_generation(ids, dict(inputs))
    return Prepared(lm.name, check_prompt(prompt), inputs, rgb, note, input_sha256(image, rgb), int(ids.shape[1]), pos,
                    pids, image if isinstance(image, Video) else None)


class Continuation(Protocol):
    """What ``capture(..., prefix=p)`` reads of a prefix (experiments.prefix.Prefix is one):
    the prepared input it was made for, the interventions (as JSON) and recording it was made
    under, where the lens resumes, and the inputs that continue from its cache."""

    prep: Prepared
    interventions: list
    recording: Recording
    start: LensStart

    def continuation_inputs(self) -> dict: ...


def interventions_json(interventions) -> list:
    return [iv.to_json() if hasattr(iv, "to_json") else repr(iv) for iv in interventions]


def check_continuation(prefix: Continuation, lm, prompt: str, sha: str, interventions, recording: Recording) -> None:
    """Raise ValueError unless ``prefix`` was made for exactly this capture."""
    p = prefix.prep
    problems = []
    if lm.name != p.model_name:
        problems.append(f"model {lm.name!r} != {p.model_name!r}")
    if prompt.strip() != p.prompt:
        problems.append("different prompt")
    if sha != p.image_sha:
        problems.append("different image")
    want = interventions_json(interventions)
    if want != prefix.interventions:
        problems.append(f"interventions {want} != {prefix.interventions}")
    if recording != prefix.recording:
        problems.append(f"recording settings {recording} != {prefix.recording}")
    if problems:
        raise ValueError("prefix does not match this capture: " + "; ".join(problems))


def center_crop_box(lm, image) -> list[float] | None:
    """(top, left, bottom, right) fractions of ``image`` that a LLaVA-style processor keeps
    (resize the shortest edge, then centre-crop); None when the whole image is used."""
    ip = getattr(lm.processor, "image_processor", None)
    if lm.family != "llava" or ip is None or not getattr(ip, "do_center_crop", False):
        return None
    short = getattr(ip.size, "shortest_edge", None)
    ch, cw = getattr(ip.crop_size, "height", None), getattr(ip.crop_size, "width", None)
    if not (short and ch and cw):
        return None
    w, h = image.size
    scale = short / min(w, h)
    rw, rh = w * scale, h * scale
    top, left = max(0.0, (rh - ch) / 2 / rh), max(0.0, (rw - cw) / 2 / rw)
    box = [top, left, 1.0 - top, 1.0 - left]
    return None if box == [0.0, 0.0, 1.0, 1.0] else [round(v, 6) for v in box]


def _layer_meta(lm, lens) -> dict:
    """What differs between the decoder layers, where it does: the layers with softmax attention (a
    hybrid stack's others have none), where the family adds vision features (DeepStack) and which
    of those the interventions stopped."""
    out = {}
    if len(lens.attention_layers) < len(lens.layers):
        out["attention_layers"] = sorted(lens.attention_layers)
    if lens.cross_layers:
        out["cross_attention_layers"] = sorted(lens.cross_layers)
    layers = lm.arch.injection_layers(lm.model)
    if layers:
        out.update(injection_layers=list(layers), injections_stopped=sorted(lens.injections.stopped))
    return out


def capture(lm, image, prompt: str, *, max_new_tokens: int = 16, interventions: Sequence = (), store: str = "all",
            hidden_dtype: str = "float16", record_attention: bool = True, record_contrib: bool = True,
            record_vision: bool = False, prefix: Continuation | None = None, time_limit: float | None = None,
            max_image_tokens: int | None = None, progress=None) -> Run:
    """Run ``image`` + ``prompt`` through ``lm`` with the lens installed; return a Run.

    The prompt is prefilled and then ``max_new_tokens`` tokens are generated greedily
    (deterministic). Every generated token is also fed back once, so hidden states and
    attention statistics cover the prompt and *all* generated tokens (the stop token, if
    produced, ends the text and is not included).

    Args:
        lm: a LoadedModel (:func:`vlmlens.load_model`).
        image: PIL image, numpy array or path (converted to RGB; the conversion is noted in meta).
        prompt: the user's text; the family's chat template is applied.
        max_new_tokens: 0..1024.
        interventions: intervention objects applied through the lens (see interventions.py).
        store: "all" hidden states, "image_text" (image + text + generated; no system
            tokens), or "none".
        hidden_dtype: "float16" (default) or "float32" (exact comparisons).
        record_attention: record attention to image keys and image maps.
        record_contrib: at the last prompt token, record each layer's attention output and the
            image tokens' contribution to it (``attn_out``, ``image_contrib`` [layer, d_model],
            ``image_contrib_norm`` [layer, n_image]; see vlmlens.analysis.attention).
        record_vision: also record the vision tower's own states of the image patches, per tower
            layer (``vision_hidden_states`` [tower layers + 1, patches, d_vision]; 0 = the tower's
            patch embeddings as its first layer reads them).
        prefix: a :class:`vlmlens.experiments.prefix.Prefix` made for this image, prompt,
            interventions and recording settings: generation continues from its KV cache
            instead of recomputing the prompt up to the last image token (same Run).
        time_limit: seconds after which generation stops cleanly (the Run then holds what was
            generated so far and ``meta["generation"]["stop_reason"] == "time limit"``).
        max_image_tokens: refuse, before any forward, an input of more image (video) tokens than this
            (a server's bound on one request: a video's frames add up).
        progress: ``progress(done, total)`` after each generated token (``total`` = ``max_new_tokens``).

    A request whose prompt + ``max_new_tokens`` exceeds the model's context is refused before
    any forward (InputError naming the numbers).
    """
    n_new = check_max_new_tokens(max_new_tokens)
    recording = Recording(store, hidden_dtype, record_attention, record_contrib, record_vision)
    interventions = list(interventions)
    validate_all(interventions, lm.n_layers)
    if prefix is None:
        inputs, rgb, note = prepare_inputs(lm, image, prompt)
    else:
        inputs, rgb, note = prefix.prep.inputs, prefix.prep.rgb, prefix.prep.note
        check_continuation(prefix, lm, check_prompt(prompt), input_sha256(image), interventions, recording)
    input_ids = inputs["input_ids"]
    n_prompt = int(input_ids.shape[1])
    img_pos = image_positions(lm, input_ids)
    if len(img_pos) == 0:
        raise InputError("the processed prompt contains no image tokens; this model's processor did not insert the image")
    check_context(lm, n_prompt, len(img_pos), n_new)
    if max_image_tokens is not None and len(img_pos) > max_image_tokens:
        what = f"{len(image.frames)} frames give" if isinstance(image, Video) else "the image gives"
        raise InputError(f"{what} {len(img_pos):,} image tokens; at most {max_image_tokens:,} are accepted here"
                         " (sample fewer frames or use a smaller image)")
    unknown = unknown_words(lm, check_prompt(prompt))
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise InputError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    L = lm.n_layers
    tcfg = lm.text_config
    plan = Plan.build(img_pos, L, n_prompt, recording, interventions, n_new=n_new, frames=video_slots(inputs))
    every_step = decides_every_step(interventions)
    if every_step and prefix is not None:
        raise InputError("an intervention that decides at every step (e.g. FastV re-ranked per step) runs every step as"
                         " a whole forward; it cannot continue from a prefix")
    t0 = time.perf_counter()
    gen_inputs = inputs if prefix is None else prefix.continuation_inputs()
    on_step = None if progress is None else (lambda done, _total: progress(min(done, n_new), n_new))
    start = None if prefix is None else prefix.start
    if every_step:
        # every step a whole forward without a cache, decided anew; then the recording forward
        whole = Plan.build(img_pos, L, n_prompt, NOTHING, interventions, whole_forwards=True,
                           frames=video_slots(inputs))
        try:
            with torch.no_grad(), Lens.for_model(lm, whole):
                out = greedy_generate(lm, gen_inputs, n_new + 1, max_time=time_limit, use_cache=False, on_step=on_step)
        except ValueError as e:
            if "image tokens" not in str(e):
                raise
            raise InputError("the model generated its own image placeholder token, which a generation without a KV"
                             " cache (an intervention deciding at every step, e.g. FastV rerank='step') reads back as"
                             f" an image ({e}); use rerank='prefill'") from None
    else:
        with torch.no_grad(), Lens.for_model(lm, plan, start=start) as lens:
            out = greedy_generate(lm, gen_inputs, n_new + 1, max_time=time_limit, on_step=on_step)
    seconds = time.perf_counter() - t0

    # generated tokens: the first n_new, cut at the stop token (which is not kept)
    seq = input_ids[0, : n_prompt - gen_inputs["input_ids"].shape[1]].tolist() + out.sequences[0].tolist()
    gen = seq[n_prompt:][:n_new]
    eos = _eos_ids(lm)
    stop = "length"
    for i, t in enumerate(gen):
        if t in eos:
            gen, stop = gen[:i], "eos"
            break
    n_gen = len(gen)
    if stop == "length" and n_gen < n_new:
        stop = "time limit" if time_limit is not None and seconds >= time_limit else "eos"
    n_total = n_prompt + n_gen
    if every_step:
        # the Run's recordings: one forward over prompt + the generated tokens -- the forward of the
        # last step, so what the interventions decided there (e.g. the kept tokens) is what is recorded
        with torch.no_grad(), Lens.for_model(lm, plan) as lens:
            lm.model(**extend_inputs(inputs, gen, lm.arch.generated_token_type), use_cache=False, return_dict=True)
    logprobs = [
        float(torch.log_softmax(out.logits[i][0].float(), -1)[t]) for i, t in enumerate(gen)
    ]
    ids = seq[:n_total]
    tok = lm.processor.tokenizer
    arrays = lens.recorder.arrays(n_total, int(tcfg.num_attention_heads))
    for iv in interventions:      # what an intervention decided during the run (e.g. tokens a pruner kept)
        report = getattr(iv, "record_arrays", None)
        if report is not None:
            arrays.update(report(lens.context, L))
    spans = TokenSpans(n_prompt, n_total, tuple(int(p) for p in img_pos))
    grid = lm.arch.grid_info(inputs, len(img_pos), processor=lm.processor, image=rgb)
    arrays["image_grid_index"] = grid.index_map().astype(np.int64)
    meta = {
        "model": lm.name,
        "family": lm.family,
        "prompt": check_prompt(prompt),
        "image_sha256": input_sha256(image, rgb),
        "image_size": list(rgb.size),
        "image_note": note,
        "generation": {"max_new_tokens": n_new, "strategy": "greedy", "stop_reason": stop},
        "interventions": interventions_json(interventions),
        "vlmlens_version": __version__,
        "n_layers": L,
        "n_heads": int(tcfg.num_attention_heads),
        "d_model": int(tcfg.hidden_size),
        "hidden_dtype": hidden_dtype if store != "none" else None,
        "store": store,
        "model_dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "capture_seconds": round(seconds, 4),
        "prefix_reuse": prefix is not None,
        "grid_order": grid.order,
        "image_box": center_crop_box(lm, rgb),
        "grid_exact": bool(grid.exact),
        **_layer_meta(lm, lens),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if unknown:
        meta["unknown_words"] = unknown
    if isinstance(image, Video):
        meta["video"] = image.meta(lm.processor.video_processor.temporal_patch_size)
    if lm.arch.cross_attention:
        meta["cross_attention"] = lm.arch.cross_key_layout(lm.model, inputs)
    return Run(
        meta=meta,
        tokens=tok.convert_ids_to_tokens(ids),
        token_ids=ids,
        spans=spans,
        image_grid=(int(grid.rows), int(grid.cols)),
        generated_text=tok.decode(gen, skip_special_tokens=True).strip(),
        token_logprobs=logprobs,
        image=rgb,
        arrays=arrays,
    )
