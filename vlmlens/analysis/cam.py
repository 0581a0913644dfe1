"""Where in the image: LLaVA-CAM (gradient-weighted maps, arXiv 2406.06579), plain attention
maps, and an overlay of either on the input picture (numpy + PIL only).

LLaVA-CAM for decoder layer l, with A = the activations at the image positions [n_image, d]:

* target ``y = sum_t logit_t(y_t)``: the logits of the answer tokens under teacher forcing
  (the logit at position p-1 of the token at position p, summed over the answer);
* ``G = dy/dA``; channel weights ``alpha_c = mean_i ReLU(G_ic)`` over image positions i;
* ``cam_i = ReLU(sum_c alpha_c A_ic)``, divided by its maximum per layer (all-zero stays 0),
  then drawn on the grid with ``run.to_grid`` (NaN in cells without a token).

Activation (``activation=``): ``"mlp_input"`` (default, as in the paper) is the input of
layer l's MLP, i.e. the output of the norm in front of the MLP (``post_attention_layernorm``
in Llama/Qwen, ``pre_feedforward_layernorm`` in Gemma3); ``"residual"`` is the residual
stream entering layer l (= ``run.hidden_states[l]``). With ``mlp_input`` the last layer's
map is identically zero: no later layer reads the image rows after the last MLP, so the
gradient there is exactly 0 (the residual input of the last layer is still read by its
attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, check_layer

ACTIVATIONS = ("mlp_input", "residual")


@dataclass
class Cam:
    """LLaVA-CAM maps; ``np.asarray(cam)`` gives ``maps``."""

    maps: np.ndarray          # [n_layers, rows, cols] in [0, 1] (NaN where no token)
    per_token: np.ndarray     # [n_layers, n_image]
    layers: list[int]
    meta: dict = field(default_factory=dict)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.maps, dtype=dtype)


def _targets(lm, run, target_tokens) -> list[int]:
    if target_tokens is None:
        ids = list(run.token_ids[run.spans.n_prompt:])
    elif isinstance(target_tokens, str):
        ids = lm.processor.tokenizer(target_tokens, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(t) for t in target_tokens]
    if not ids:
        raise InputError("no answer tokens to explain: the run generated nothing; pass target_tokens")
    return ids


class _Taps:
    """An intervention of the lens that only reads: it makes the embeddings the backward's one
    leaf, keeps the image rows of the chosen activations (``edit_resid_pre`` for the residual,
    ``read_mlp_input`` for the MLP input) and, when their gradient arrives in the backward,
    turns it into the CAM."""

    def __init__(self, rows: torch.Tensor, layers: list[int], activation: str):
        self.rows, self.layers, self.activation = rows, set(layers), activation
        self.leaf: torch.Tensor | None = None
        self.cam: dict[int, torch.Tensor] = {}

    def tap(self, layer: int, x: torch.Tensor) -> None:
        a = x[0, self.rows].detach()

        def on_grad(g, layer=layer, a=a):
            gi = g[0, self.rows].float()
            alpha = torch.relu(gi).mean(0)                      # [d]
            self.cam[layer] = torch.relu(a.float() @ alpha).cpu()
        x.register_hook(on_grad)

    def edit_resid_pre(self, layer, hidden, ctx):
        new = None
        if layer == 0:
            new = hidden = self.leaf = hidden.detach().requires_grad_(True)
        if self.activation == "residual" and layer in self.layers:
            self.tap(layer, hidden)
        return new

    def read_mlp_input(self, layer, x, ctx):
        if self.activation == "mlp_input" and layer in self.layers:
            self.tap(layer, x)


class _frozen_params:
    """Parameters stop requiring grad inside the block (no weight gradients, less saved state)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


def _cam_interventions(run, interventions):
    """The interventions the CAM's forward applies: ``interventions`` if given, else the run's own
    (rebuilt from its meta), each in its ``gradient_safe`` form: ``Truncate(k, "remove")`` becomes
    ``Truncate(k, "drop")``, the same outputs (tested), but the image rows stay in place for the
    taps (their CAM is then 0 from k on, as nothing downstream reads them)."""
    from ..interventions import from_json, gradient_safe

    if interventions is None:
        stored = run.meta.get("interventions") or []
        if any(not isinstance(d, dict) for d in stored):
            raise InputError("the run was captured with a custom intervention that cannot be rebuilt from its "
                             "meta; pass interventions=[...] to llava_cam")
        interventions = [from_json(d) for d in stored]
    return [gradient_safe(iv) for iv in interventions]


def llava_cam(lm, run, *, layers=None, target_tokens=None, activation: str = "mlp_input",
              interventions=None, video=None) -> Cam:
    """LLaVA-CAM of every (or the chosen) decoder layer, in one forward + one backward.

    Args:
        lm: the LoadedModel the run was captured with.
        run: a Run; its image and prompt are rebuilt with ``capture.prepare_inputs``.
        layers: decoder layers (0..L-1); default all.
        target_tokens: the answer to explain: None = the run's generated tokens, a string
            (tokenized without special tokens) or a list of token ids, teacher-forced after
            the prompt.
        activation: ``"mlp_input"`` or ``"residual"`` (see the module docstring).
        interventions: applied in the CAM's forward, so that the map explains the answer of the
            model the run was captured with; default: the run's own (from its meta); ``[]``: none.
        video: for a video run, the :class:`vlmlens.video.Video` it was captured from (a run keeps only
            its contact sheet, not every frame); checked against the run's fingerprint.

    The forward runs with grad through the lens (SDPA, no recording) with the model's
    parameters frozen; the embeddings entering decoder layer 0 are the only leaf, so the
    backward computes no weight gradients. Each tapped activation keeps only its image rows
    (model dtype) until its gradient arrives, when it is reduced to an [n_image] CAM at once.
    Peak memory above the weights is the forward's saved activations for the backward plus
    ``L x n_image x d`` kept activations: for a 7B LLaVA-1.5 (32 layers, d 4096, 576 image
    tokens) at 640 tokens in fp16 about 70 MB per decoder layer (measured: saved-tensor bytes
    of one 7B-shaped Llama layer with frozen weights, 141 MB in fp32) -> ~2.3 GB, plus 150 MB
    of kept image rows and T x vocab logits.
    """
    from ..capture import extend_inputs, prepare_inputs
    from ..interventions import validate_all
    from ..lens import Lens, Plan

    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    L = lm.n_layers
    layers = list(range(L)) if layers is None else sorted({check_layer("LLaVA-CAM layer", l, 0, L - 1)
                                                              for l in layers})
    ivs = _cam_interventions(run, interventions)
    validate_all(ivs, L)
    if lm.arch.cross_attention:
        raise InputError(f"LLaVA-CAM weights the image tokens' rows of the stream; {lm.family} has none (it reads the"
                         " image by cross-attention)")
    source = run.image
    if run.meta.get("video"):
        if video is None or video.sha256() != run.meta.get("image_sha256"):
            raise InputError("LLaVA-CAM of a video run needs the video it was captured from (video=...): the run keeps"
                             " one frame per temporal slot, not every frame" + ("" if video is None else
                                                                               "; this video is another one"))
        source = video
    inputs, _, _ = prepare_inputs(lm, source, run.prompt)
    n_prompt = run.spans.n_prompt
    if inputs["input_ids"][0].tolist() != list(run.token_ids[:n_prompt]):
        raise InputError("the run's prompt tokens differ from what this model builds for its image + prompt")
    targets = _targets(lm, run, target_tokens)
    full = extend_inputs(inputs, targets, lm.arch.generated_token_type)
    img = run.spans.positions("image")
    taps = _Taps(torch.as_tensor(img, device=lm.device), layers, activation)
    plan = Plan.build(img, L, n_prompt, interventions=[taps, *ivs])
    T = len(targets)
    kw = {"logits_to_keep": T + 1} if lm.model._supports_logits_to_keep() else {}
    with _frozen_params(lm.model), torch.enable_grad(), Lens.for_model(lm, plan):
        logits = lm.model(**full, use_cache=False, **kw).logits[0, -(T + 1):-1].float()   # [T, vocab]
        y = logits.gather(1, torch.tensor(targets, device=logits.device)[:, None]).sum()
        torch.autograd.grad(y, [taps.leaf])
    per_token = torch.stack([taps.cam[l] for l in layers]).numpy().astype(np.float32)   # [n, n_image]
    top = per_token.max(axis=1, keepdims=True)
    per_token = np.where(top > 0, per_token / np.where(top > 0, top, 1), 0.0).astype(np.float32)
    tok = lm.processor.tokenizer
    meta = {
        "method": "llava_cam", "activation": activation, "layers": layers, "target_ids": targets,
        "target_text": tok.decode(targets), "target_logit_sum": float(y.detach()),
        "weights": "alpha_c = mean_i ReLU(dy/dA_ic)", "normalisation": "per layer / max",
        "interventions": [iv.to_json() if hasattr(iv, "to_json") else repr(iv) for iv in ivs],
    }
    return Cam(run.to_grid(per_token), per_token, layers, meta)


def attach_cam(lm, run, **kwargs):
    """Compute LLaVA-CAM for all layers and store it in ``run`` (returned): array
    ``llava_cam`` [L, n_image] and ``meta["llava_cam"]`` (activation, target, ...)."""
    cam = llava_cam(lm, run, layers=None, **kwargs)
    run.arrays["llava_cam"] = cam.per_token
    run.meta["llava_cam"] = cam.meta
    return run


def cam_from_run(run) -> Cam:
    """The CAM stored by :func:`attach_cam` (KeyError if absent)."""
    if "llava_cam" not in run.arrays:
        raise KeyError("this run has no LLaVA-CAM; call vlmlens.analysis.cam.attach_cam(lm, run)")
    pt = np.asarray(run.arrays["llava_cam"], np.float32)
    meta = dict(run.meta.get("llava_cam", {}))
    return Cam(run.to_grid(pt), pt, list(range(pt.shape[0])), meta)


def attention_map(run, *, layer: int, query_index: int = 0) -> np.ndarray:
    """Head-averaged attention of one recorded query over the image tokens, on the grid
    [rows, cols] (raw attention mass; query 0 = last prompt token, then each generated token)."""
    return run.to_grid(run.attention_maps[layer, query_index])


# ---- overlay ----------------------------------------------------------------------------

# colour maps as anchor colours at evenly spaced stops (linearly interpolated)
_ANCHORS = {
    "inferno": [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)],
    "viridis": [(68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
                (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}


def colormap(name: str = "inferno", n: int = 256) -> np.ndarray:
    """[n, 3] uint8 lookup table for ``name`` (inferno, viridis, gray)."""
    if name not in _ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; expected one of {tuple(_ANCHORS)}")
    a = np.asarray(_ANCHORS[name], dtype=np.float64)
    x = np.linspace(0, 1, len(a))
    t = np.linspace(0, 1, n)
    return np.stack([np.interp(t, x, a[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def normalize(values, vmin=None, vmax=None) -> np.ndarray:
    """Scale to [0, 1] by (v - vmin) / (vmax - vmin) (finite min/max by default); NaN stays NaN."""
    v = np.asarray(values, dtype=np.float64)
    fin = v[np.isfinite(v)]
    lo = float(vmin) if vmin is not None else (float(fin.min()) if fin.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(fin.max()) if fin.size else 1.0)
    span = hi - lo if hi > lo else 1.0
    return np.clip((v - lo) / span, 0.0, 1.0)


def overlay(image, grid_values, *, alpha: float = 0.5, cmap: str = "inferno", vmin=None, vmax=None,
            box=(0.0, 0.0, 1.0, 1.0), smooth: bool = True) -> Image.Image:
    """Blend a [rows, cols] heatmap over ``image`` (PIL, RGB result of the same size).

    Values are scaled to [0, 1] (:func:`normalize`), upsampled over ``box`` = (top, left,
    bottom, right) as fractions of the image (default: the whole image; pass the processor's
    crop when the grid covers only part of it) -- bilinear with ``smooth``, else nearest --
    coloured with ``cmap`` and blended with weight ``alpha``. NaN cells are left uncoloured.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = image.convert("RGB")
    W, H = img.size
    g = np.asarray(grid_values, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"grid_values must be [rows, cols], got shape {g.shape}")
    valid = np.isfinite(g)
    v = np.where(valid, normalize(g, vmin, vmax), 0.0)
    top, left, bottom, right = box
    x0, y0 = int(round(left * W)), int(round(top * H))
    x1, y1 = max(x0 + 1, int(round(right * W))), max(y0 + 1, int(round(bottom * H)))
    rs = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    up = np.asarray(Image.fromarray(v.astype(np.float32), "F").resize((x1 - x0, y1 - y0), rs))
    m = np.asarray(Image.fromarray(valid.astype(np.float32), "F").resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST))
    lut = colormap(cmap)
    col = lut[np.clip((up * 255).round().astype(int), 0, 255)].astype(np.float32)
    base = np.asarray(img, dtype=np.float32).copy()
    w = (alpha * m)[..., None]
    base[y0:y1, x0:x1] = (1 - w) * base[y0:y1, x0:x1] + w * col
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8), "RGB")


def hit_cell(grid_values) -> tuple[int, int] | None:
    """(row, col) of the largest finite value (first in raster order on ties); None when no
    cell is above 0 (an all-zero CAM points nowhere)."""
    g = np.asarray(grid_values, dtype=np.float64)
    flat = np.where(np.isfinite(g), g, -math.inf).ravel()
    i = int(np.argmax(flat))
    if not flat[i] > 0:
        return None
    return tuple(int(x) for x in divmod(i, g.shape[1]))
