"""Figures: pure functions ``fig_<thing>(run_or_runs, *, options) -> plotly Figure``.

One module per topic; this package re-exports every figure by name (imported on first use,
so ``import vlmlens.figures`` stays cheap).
"""
import importlib

_WHERE = {
    # representation dynamics
    "fig_dynamics": "dynamics",
    "fig_layer_similarity": "dynamics",
    "fig_token_umap": "dynamics",
    "fig_token_movement": "movement",
    # attention flow, heatmaps, logit lens
    "fig_attention_flow": "attention",
    "fig_attention_heads": "attention",
    "fig_cam_grid": "heatmaps",
    "fig_cam_layer": "heatmaps",
    "fig_logit_lens": "heatmaps",
    "fig_patch_lens": "heatmaps",
    # interventions and experiments
    "fig_truncation_sweep": "experiments",
    "fig_sweep_modes": "experiments",
    "fig_side_by_side": "experiments",
    "fig_substitution_matrix": "matrices",
    "fig_layer_skip": "matrices",
    "fig_task_necessity": "experiments",
    "fig_compute_tradeoff": "matrices",
    "fig_reasoning_perturbation": "experiments",
    # encoder x decoder depth
    "fig_encoder_grid": "encoder",
    "fig_encoder_decoder_dynamics": "encoder",
    # studies on a dataset
    "fig_dataset_study": "study",
    # token pruning
    "fig_pruning_pareto": "pruning",
    "fig_kept_tokens": "pruning",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
