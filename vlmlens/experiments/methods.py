"""Token-pruning methods by name: the written form of ``--methods`` (and the Compute tab), the
default comparison grid, and what each method keeps, said unambiguously (keep vs drop)."""
from __future__ import annotations

from typing import Sequence

from ..errors import InputError
from ..interventions import VTW, AdaptiveVTW, FastV, PyramidDrop, StagePruner, validate_all
from ..vocabulary import METHOD_SYNTAX


def default_methods(n_layers: int, keep: Sequence[float] = (0.5, 0.25), layer: int | None = None) -> dict:
    """A comparison grid: FastV and its random / L2 baselines at each keep ratio (pruning from
    ``layer``, default 2 -- FastV's K -- or 1 for shallow models), PyramidDrop over quarters of the
    depth, VTW at every quarter and adaptive VTW. Names are what tables and figures show."""
    L = int(n_layers)
    K = layer if layer is not None else (2 if L >= 6 else 1)
    out: dict[str, list] = {}
    for r in keep:
        pct = f"{100 * r:g}%"
        out[f"FastV K={K} keep {pct}"] = [FastV(K, r)]
        out[f"random K={K} keep {pct}"] = [FastV(K, r, score="random")]
        out[f"L2 K={K} keep {pct}"] = [FastV(K, r, score="l2")]
    stages = sorted({max(1, L // 4), max(1, L // 2), max(1, (3 * L) // 4)})
    ratios = [0.5, 0.25, 0.125][:len(stages)]
    out[f"PyramidDrop {'/'.join(map(str, stages))}"] = [PyramidDrop(stages, ratios)]
    for k in sorted({0, L // 4, L // 2, (3 * L) // 4}):
        out[f"VTW k={k}"] = [VTW(k)]
    for share in (0.2, 0.4):
        out[f"adaptive VTW share<{share:g}"] = [AdaptiveVTW(share, min_layer=1 if L > 2 else 0)]
    return out


def check_methods(methods: dict, n_layers: int) -> dict:
    """Methods given as {name: [interventions]}, each validated against the model."""
    if not isinstance(methods, dict) or not methods:
        raise InputError("give at least one method: {name: [interventions]}")
    for ivs in methods.values():
        validate_all(list(ivs), n_layers)
    return methods


def _num(text: str, what: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise InputError(f"{what} must be a {'number' if kind is float else 'whole number'}, got {text!r}") from None


def _keep(text: str, what: str) -> float:
    """A keep ratio as written: "0.25" or "keep=0.25" (kept), "drop=0.75" (dropped, the FastV
    paper's R); each also as a percentage ("drop=75%")."""
    s = text.strip().lower().replace(" ", "")
    drop = s.startswith("drop=")
    if drop or s.startswith("keep="):
        s = s.split("=", 1)[1]
    pct = s.endswith("%")
    v = _num(s[:-1] if pct else s, what)
    v = v / 100 if pct else v
    if drop:
        if not 0 <= v < 1:
            raise InputError(f"{what}: drop must be in [0, 1) (the fraction of image tokens dropped), got {text!r}")
        return round(1 - v, 12)
    return v


def describe_method(ivs) -> str:
    """What a method does, unambiguously ("keep 25 % (drop 75 %) from layer 2 ..."), from its interventions."""
    parts = [iv.describe() if hasattr(iv, "describe") else repr(iv) for iv in ivs]
    return "; ".join(parts) if parts else "no pruning"


def parse_methods(text: str, n_layers: int, stage_labels: Sequence[str] | None = None) -> dict:
    """Methods from their written form (``METHOD_SYNTAX``), validated against the model;
    ``stages:R`` needs the per-layer causal stage labels (``CausalStages.labels``)."""
    if not text or not text.strip():
        raise InputError(f"no methods given; {METHOD_SYNTAX}")
    if text.strip() == "default":
        return default_methods(n_layers)
    out = {}
    for spec in (s.strip() for s in text.split(",")):
        parts = spec.split(":")
        kind = parts[0].lower()
        arity = {"fastv": 3, "random": 3, "l2": 3, "pdrop": 3, "vtw": 2, "adaptive": 2, "stages": 2, "patch": 3,
                 "fastervlm": 2, "divprune": 2, "downsample": 2, "dart": 3}
        if kind not in arity:
            raise InputError(f"unknown method {spec!r}; {METHOD_SYNTAX}")
        rerank = "prefill"
        if kind in ("fastv", "pdrop") and len(parts) == arity[kind] + 1:
            rerank = parts.pop().strip().lower()
            if rerank not in ("prefill", "step"):
                raise InputError(f"method {spec!r}: the last part must be step (re-ranked at every step) or prefill"
                                 f" (ranked once), got {rerank!r}")
        if len(parts) != arity[kind]:
            raise InputError(f"method {spec!r} needs {arity[kind] - 1} value(s) after {kind}:; {METHOD_SYNTAX}")
        if kind in ("fastv", "random", "l2"):
            k, r = _num(parts[1], f"{spec}: the layer", int), _keep(parts[2], f"{spec}: the keep ratio")
            score = {"fastv": "last", "random": "random", "l2": "l2"}[kind]
            ivs = [FastV(k, r, score=score, rerank=rerank)]
        elif kind == "pdrop":
            ls = [_num(x, f"{spec}: a layer", int) for x in parts[1].split("/")]
            ratios = parts[2].strip().lower()
            pre = next((p for p in ("keep=", "drop=") if ratios.startswith(p)), "")
            rs = [_keep(pre + x, f"{spec}: a keep ratio") for x in ratios[len(pre):].split("/")]
            ivs = [PyramidDrop(ls, rs, rerank=rerank)]
        elif kind == "dart":
            from ..interventions import DART

            ivs = [DART(_num(parts[1], f"{spec}: the layer", int), _keep(parts[2], f"{spec}: the keep ratio"))]
        elif kind == "downsample":
            from ..interventions import Downsample

            ivs = [Downsample(_keep(parts[1], f"{spec}: the keep ratio"))]
        elif kind == "vtw":
            ivs = [VTW(_num(parts[1], f"{spec}: the layer", int))]
        elif kind in ("patch", "fastervlm", "divprune"):
            from ..interventions import PatchPrune

            score = parts[2].strip().lower() if kind == "patch" else {"fastervlm": "cls", "divprune": "divprune"}[kind]
            ivs = [PatchPrune(_keep(parts[1], f"{spec}: the keep ratio"), score)]
        elif kind == "stages":
            if not stage_labels:
                raise InputError(f"{spec} needs this input's causal stages: find them first (dashboard: Attention tab, "
                                 "'Find the three stages'; command line: --calibrate)")
            if len(stage_labels) != n_layers:
                raise InputError(f"{spec}: {len(stage_labels)} stage labels for a model with {n_layers} layers")
            ivs = [StagePruner.from_stages(list(stage_labels), top=_keep(parts[1], f"{spec}: the keep ratio"))]
        else:
            ivs = [AdaptiveVTW(_num(parts[1], f"{spec}: the attention share"), min_layer=1 if n_layers > 2 else 0)]
        validate_all(ivs, n_layers)
        out[spec] = ivs
    return out
