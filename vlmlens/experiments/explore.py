"""What the dashboard shows of a new input, as one library step: :func:`explore`.

The capture (the vision tower's states included), the model-dependent analyses stored in the run
so that every view needs only the Run (LLaVA-CAM, the logit / patch lens), the FLOP / KV-cache
savings per depth from theory, and on small models the knockout windows behind the three stages;
plus what the user should be told about the input (conversions, the time limit, words the model
does not know, a picture from outside the world tiny-shapes was trained on). An analysis that fails
on this run is named in ``run.meta["analysis_failed"]``; the capture itself still succeeds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..run import Run

#: models this shallow get their knockout stages with the capture (3L + 1 teacher-forced forwards)
AUTO_STAGES_MAX_LAYERS = 12


@dataclass
class Exploration:
    run: Run
    extras: dict = field(default_factory=dict)      # "compute" (theory), "stages" (or {"undefined": why})
    notes: list[str] = field(default_factory=list)  # about the input: conversions, scaling, frames
    warnings: list[str] = field(default_factory=list)
    video: object = None                            # the Video, for a video run


def _failed(run: Run, name: str, e: Exception) -> None:
    run.meta.setdefault("analysis_failed", {})[name] = f"{type(e).__name__}: {e}"


def add_analysis_arrays(lm, run: Run, video=None) -> list[str]:
    """Store the model-dependent analyses in the run, so that figures (and the app without a
    model) need only the Run: LLaVA-CAM and the logit / patch lens. Returns the names added;
    an analysis that fails on this run is skipped and named in ``run.meta["analysis_failed"]``
    (e.g. a family whose CAM backward is unsupported). A video run's CAM needs its ``video``."""
    from ..analysis.cam import attach_cam
    from ..analysis.logit_lens import attach_logit_lens

    added = []
    jobs = [("llava_cam", lambda lm, run: attach_cam(lm, run, video=video), "llava_cam" not in run.arrays),
            ("logit_lens", attach_logit_lens, "hidden_states" in run.arrays and "logit_lens_ids" not in run.arrays)]
    for name, attach, wanted in jobs:
        if not wanted:
            continue
        try:
            attach(lm, run)
            added.append(name)
        except Exception as e:  # noqa: BLE001 -- reported in the run's meta, the run stays usable
            _failed(run, name, e)
    return added


def explore(lm, source, prompt: str, max_new_tokens: int, *, time_limit: float | None = None,
            max_image_tokens: int | None = None, notes: list[str] = (), stages: bool | None = None,
            progress: Callable[[float, str], None] | None = None) -> Exploration:
    """Capture ``source`` (an RGB image or a Video) with ``prompt`` and measure what the dashboard shows
    of it. ``notes``: what was done to the input before (conversion, scaling), kept in the run's meta.
    ``stages``: run the knockout windows (default: on models of at most AUTO_STAGES_MAX_LAYERS layers)."""
    from ..analysis.compute import compute_tradeoff
    from ..capture import capture
    from ..video import Video
    from .stages import causal_stages, stages_undefined

    step = progress or (lambda fraction, what: None)
    video = source if isinstance(source, Video) else None
    notes = [n for n in notes if n]
    step(0.2, f"capturing {lm.n_layers} layers")
    run = capture(lm, source, prompt, max_new_tokens=max_new_tokens, time_limit=time_limit, record_vision=True,
                  max_image_tokens=max_image_tokens,
                  progress=lambda done, total: step(0.2 + 0.5 * done / max(total, 1), f"token {done} of {total}"))
    out = Exploration(run, notes=list(notes), video=video)
    if notes:
        run.meta["image_note"] = "; ".join(notes)
    if lm.name == "tiny-shapes" and video is None:
        from ..tiny.world_check import shapes_world_check

        why = shapes_world_check(source)
        if why:
            run.meta["out_of_world"] = why
            out.warnings.append(f"this image does not look like the shapes world tiny-shapes was trained on: {why}")
    if run.meta.get("generation", {}).get("stop_reason") == "time limit":
        out.warnings.append(f"generation stopped at the {time_limit:.0f} s time limit of one request "
                            f"({len(run.generated_tokens)} tokens)")
    if run.meta.get("unknown_words"):
        out.warnings.append(f"{lm.name} does not know: {', '.join(run.meta['unknown_words'])} (read as its unknown token)")
    step(0.7, "logit lens and LLaVA-CAM")
    add_analysis_arrays(lm, run, video=video)
    try:
        out.extras["compute"] = compute_tradeoff(lm, source, prompt, measure=False)
    except Exception as e:  # noqa: BLE001 -- named in the run's meta; the views say it is missing
        _failed(run, "compute", e)
    if (lm.n_layers <= AUTO_STAGES_MAX_LAYERS) if stages is None else stages:
        step(0.8, "knockout windows (three stages)")
        why = stages_undefined(lm)
        try:
            out.extras["stages"] = ({"undefined": why} if why else
                                    causal_stages(lm, source, prompt, max_new_tokens=max_new_tokens).to_json())
        except Exception as e:  # noqa: BLE001
            _failed(run, "stages", e)
    return out
