"""Recovery study: per depth k, an adapter trained with the image cut at k, evaluated per task
family against the untruncated and the truncated model (see :mod:`.recovery`).

Evaluation is the study engine's: on tiny-shapes the shapes test split with ground truth
(:func:`vlmlens.experiments.study.task_study`: single-word accuracy, caption exact match and
token F1, final answers of reasoning traces); with a user's evaluation dataset,
:func:`vlmlens.experiments.dataset_study.dataset_study` and its task metrics. ``recovered`` is
the share of the truncation's loss the adapter wins back, ``(adapted - truncated) /
(baseline - truncated)``, only where truncation lost at least 5 points (else None: nothing to
recover).

Files in ``out``: ``k{K}/`` the adapter of depth K (peft's format, with its training log),
``recovery.json`` and ``recovery.csv`` (one row per family x depth).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .._version import __version__
from ..errors import InputError
from .recovery import RecoveryConfig, dataset_items, shapes_items, train_recovery
from ..tables import Table, percent

CSV_COLUMNS = ("family", "depth", "n", "baseline", "truncated", "adapted", "recovered", "adapted_full",
               "val_loss_before", "val_loss_after", "train_seconds")
MIN_GAP = 0.05


@dataclass
class RecoveryStudy:
    model: str
    metric: str
    depths: list
    rows: list
    config: dict
    train: list              # TrainLog per depth (as dicts)
    vlmlens_version: str = __version__

    def to_json(self) -> dict:
        return asdict(self)

    def csv(self) -> str:
        return Table(CSV_COLUMNS, self.rows).csv()

    def markdown(self) -> str:
        cols = ["baseline", "truncated", "adapted", "recovered", "adapted_full"]
        return Table(["family", "depth", *cols], self.rows,
                     headers=["family", "k", "untruncated", "truncated at k", "truncated + LoRA", "gap recovered",
                              "LoRA, untruncated"], formats={c: percent for c in cols}).markdown()


def _recovered(base, trunc, adapted):
    if base is None or trunc is None or adapted is None or base - trunc < MIN_GAP:
        return None
    return (adapted - trunc) / (base - trunc)


def _evaluate(lm, depths, n_eval, eval_data, tmp: Path, metric: str) -> dict:
    """{(family, depth): score} under the model as it is now (adapters on or off)."""
    if eval_data is None:
        from .study import task_study

        res = task_study(lm, n=n_eval, depths=depths)
        return {(r["family"], r["depth"]): r[metric] for r in res.rows}
    from .dataset_study import dataset_study

    shutil.rmtree(tmp, ignore_errors=True)
    res = dataset_study(lm, eval_data, tmp, depths=depths, max_new_tokens=32, batch_size=8)
    shutil.rmtree(tmp, ignore_errors=True)
    return {(r["task"], r["depth"]): r["score"] for r in res.rows}


def recovery_study(lm, depths, out, *, cfg: RecoveryConfig = RecoveryConfig(), n_train: int = 4000, n_eval: int = 50,
                   data=None, eval_data=None, metric: str = "accuracy", log=None) -> RecoveryStudy:
    """Train one adapter per depth in ``depths`` and evaluate (see the module docstring).

    ``data`` / ``eval_data``: :class:`vlmlens.data.Dataset` to train on / evaluate with (rows
    with answers); without them, the shapes world's train split and test split (tiny-shapes)."""
    from .engine import parse_depths

    L = lm.n_layers
    ks = [k for k in parse_depths(depths, L) if k < L]
    if not ks:
        raise InputError(f"give depths below {L} (the untruncated model has nothing to recover)")
    if (data is None) != (eval_data is None):
        raise InputError("give both a training dataset and an evaluation dataset, or neither (the shapes world)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        items = shapes_items(n_train, weights=cfg.family_weights, seed=cfg.seed)
        val = shapes_items(64, split="val", weights=cfg.family_weights, seed=cfg.seed + 1)
    else:
        items, val = dataset_items(data), dataset_items(eval_data)[:64]
    base = _evaluate(lm, ks + [L], n_eval, eval_data, out / ".eval", metric)
    rows, logs = [], []
    for k in ks:
        pm, tl = train_recovery(lm, k, items, cfg, val_items=val, out=out / f"k{k}", log=log)
        try:
            adapted = _evaluate(lm, [k, L], n_eval, eval_data, out / ".eval", metric)
        finally:
            lm.model = pm.unload()         # the plain model back, adapters removed
        logs.append(asdict(tl))
        for fam in sorted({f for f, _ in base}):
            b, t, a = base.get((fam, L)), base.get((fam, k)), adapted.get((fam, k))
            rows.append({"family": fam, "depth": k, "n": n_eval if eval_data is None else None, "baseline": b,
                         "truncated": t, "adapted": a, "recovered": _recovered(b, t, a),
                         "adapted_full": adapted.get((fam, L)), "val_loss_before": tl.val_loss_before,
                         "val_loss_after": tl.val_loss_after, "train_seconds": tl.seconds})
    res = RecoveryStudy(lm.name, metric, ks, rows, {**asdict(cfg), "n_train": len(items), "n_eval": n_eval,
                                                    "data": getattr(data, "source", None),
                                                    "eval_data": getattr(eval_data, "source", None)}, logs)
    (out / "recovery.json").write_text(json.dumps(res.to_json(), indent=1))
    (out / "recovery.csv").write_text(res.csv())
    return res
