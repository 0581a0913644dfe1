"""The headline statements of a run, each causally measured, a labelled proxy, or "not found".

:func:`findings` turns one run and the experiments stored with it (the truncation sweep,
the knockout windows of :mod:`vlmlens.experiments.stages`, the substitution matrix, the
compute model) into a list of :class:`Finding`. Every finding carries its *status*:

* ``causal``: read off an intervention the tool ran (truncation, knockout, substitution);
* ``measured``: a direct measurement of the run, not an intervention (how far the tokens
  move, where attention goes); it says what it measures and nothing more;
* ``proxy``: a rule on recorded statistics standing in for a causal test; labelled so;
* ``not found``: the rule was applied and found nothing (stated in words);
* ``unverified``: it needs an experiment that was not run (which one is said).

Definitions (each finding also carries its own ``definition`` text):

* **answer vs truth**: the generated answer (after the separator when there is one) equals
  the ground truth (shapes-world scenes have it).
* **sweep cliff**: the shallowest depth k such that cutting the image from layer k on keeps
  the answer at k and at every deeper depth; a non-monotonic kept/lost pattern is spelled out.
* **VTW depth** (arXiv 2405.05803's criterion): the shallowest depth whose withdrawal of the
  image changes the output by at most ``eta`` nats of KL summed over the generated tokens.
* **attention cliff** (measured): the first layer from which the last prompt token's image
  share stays below 25 % of its peak (:func:`vlmlens.analysis.attention.attention_cliff`).
* **visual stabilisation** (measured): image tokens stable from layer m when every later layer
  moves 90 % of them by at most 5 % of their norm (:mod:`vlmlens.analysis.stability`).
* **functional stabilisation** (causal): the smallest layer i whose image states can replace
  those of every later layer of the substitution grid without changing the answer.
* **three stages** (causal): sink / fusion / discard from knockout windows
  (:mod:`vlmlens.experiments.stages`); the cosine rule is shown beside it as a proxy.
* **compute saved**: FLOPs saved by removing the image from the sweep cliff on, only when a
  drop/remove sweep verified that depth (drop and remove give the same tokens).
* **frozen image states** (causal, a freeze sweep's own statement): the shallowest depth k from
  which freezing the image tokens' states (every later layer still reads them) keeps the answer
  there and deeper. The sweep cliff, the VTW depth and the compute saved are defined on a drop
  or remove sweep only (the image is no longer read); a freeze sweep never stands in for them.

* **map check** (causal): a heatmap's deletion / insertion curves against random orders
  (:mod:`vlmlens.experiments.map_check`), one headline per map checked on the run.

A run may hold one sweep per mode (``extras["sweeps"]``; older runs one ``extras["sweep"]``):
:func:`run_files.sweeps_of` collects them, :func:`headline_sweep` picks the drop (else remove) one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .experiments.cliff import cliff_from
from .metrics import DEFAULT_SEPARATOR, answer_of
from .run_files import sweeps_of

STATUSES = ("causal", "measured", "proxy", "not found", "unverified")
DEFAULT_ETA = 0.1


@dataclass
class Finding:
    key: str
    title: str
    status: str
    text: str
    definition: str
    value: object = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# ---- small readers --------------------------------------------------------------------------------

def ranges(values) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0–2, 5–6"``."""
    vs = sorted(int(v) for v in values)
    out, i = [], 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}–{vs[j]}")
        i = j + 1
    return ", ".join(out)


def kept_pattern(depths, kept) -> str:
    """``"kept at 0–5, 8; lost at 6–7"`` (the depths where the answer was kept / lost)."""
    k = [d for d, x in zip(depths, kept) if x]
    lost = [d for d, x in zip(depths, kept) if not x]
    return "; ".join(([f"kept at {ranges(k)}"] if k else []) + ([f"lost at {ranges(lost)}"] if lost else []))


def is_monotonic(depths, kept) -> bool:
    """True when the answer is lost up to some depth and kept from there on."""
    seq = [x for _, x in sorted(zip(depths, kept))]
    return all(not (a and not b) for a, b in zip(seq, seq[1:]))


#: the modes whose sweep withdraws the image (the model no longer reads it from layer k on)
HEADLINE_MODES = ("drop", "remove")


def headline_sweep(sweeps: dict) -> dict | None:
    """The sweep the cliff / VTW / compute headlines are read from: drop, else remove, else none."""
    return next((sweeps[m] for m in HEADLINE_MODES if sweeps.get(m) is not None), None)


def _not_a_withdrawal(key: str, title: str, sweep: dict, definition: str) -> Finding | None:
    mode = sweep.get("mode", "drop")
    if mode in HEADLINE_MODES:
        return None
    return Finding(key, title, "unverified",
                   f"unverified: defined on a drop or remove sweep, and this sweep used {mode} (the frozen image is"
                   f" still read by every later layer; see 'frozen image states'); run a drop or remove sweep",
                   definition)


def run_truth(run) -> str | None:
    """The ground-truth answer stored with a run (``meta["task"]["answer"]``), if any."""
    task = run.meta.get("task") or {}
    ans = task.get("answer")
    return str(ans) if ans not in (None, "") else None


def _depth_rows(sweep: dict):
    ds = sorted(sweep.get("depths", []), key=lambda d: d["depth"])
    return ds, [d["depth"] for d in ds], [bool(d.get("answer_kept")) for d in ds]


def _output_kl(d: dict) -> float:
    """Summed KL over the generated tokens (older results: over the answer, then the first token)."""
    for key in ("output_kl", "answer_kl"):
        v = d.get(key)
        if v is not None and np.isfinite(v):
            return float(v)
    return float(d.get("first_token_kl", float("nan")))


# ---- the findings ---------------------------------------------------------------------------------

def truth_finding(run, truth: str | None, separator: str = DEFAULT_SEPARATOR) -> Finding | None:
    if truth is None:
        return None
    said, want = answer_of(run.generated_text, separator), answer_of(truth, separator)
    ok = said == want
    text = f"correct ({want!r})" if ok else f"wrong: said {said!r}, truth {want!r}"
    return Finding("truth", "answer vs ground truth", "measured", text,
                   "the generated answer (after the separator when present, normalised) equals the scene's truth", ok)


def sweep_cliff_finding(sweep: dict | None) -> Finding:
    definition = ("shallowest depth k such that cutting the image from decoder layer k on keeps the answer at k and at "
                  "every deeper depth of the sweep")
    if not sweep:
        return Finding("sweep_cliff", "sweep cliff", "unverified", "no sweep for this run (Truncation tab: all)",
                       definition)
    refused = _not_a_withdrawal("sweep_cliff", "sweep cliff", sweep, definition)
    if refused:
        return refused
    ds, depths, kept = _depth_rows(sweep)
    L = int(sweep["n_layers"])
    cliff, _ = cliff_from(depths, kept, None, L)
    mode = sweep.get("mode", "drop")
    pattern = kept_pattern(depths, kept)
    mono = is_monotonic(depths, kept)
    if cliff >= L:
        text = f"depth {L} ({mode}): the answer needs the image in every layer"
        if any(kept[:-1]):
            text += f" — but not monotonically: {pattern}"
        status = "causal"
    elif cliff == 0:
        text = f"depth 0 ({mode}): the answer is kept even when the model never reads the image"
        status = "causal"
    else:
        text = f"depth {cliff} ({mode}): cutting the image from layer {cliff} on keeps the answer there and deeper"
        if not mono:
            text += f" — non-monotonic: {pattern}"
        status = "causal"
    extra = {"pattern": pattern, "monotonic": mono, "mode": mode}
    truth = sweep.get("truth")
    corr = [d.get("correct") for d in ds]
    if truth is not None and any(c is not None for c in corr):
        base_ok = sweep.get("baseline_correct")
        right = [d for d, c in zip(depths, corr) if c]
        if base_ok is False and right:
            text += f"; cutting the image fixes the baseline's mistake at depths {ranges(right)}"
        elif base_ok and len(right) < len(depths):
            wrong = [d for d, c in zip(depths, corr) if c is False]
            text += f"; wrong against the truth at depths {ranges(wrong)}"
        extra["correct_depths"] = right
    return Finding("sweep_cliff", "sweep cliff", status, text, definition, cliff, extra)


def vtw_finding(sweep: dict | None, eta: float = DEFAULT_ETA) -> Finding:
    definition = (f"VTW's criterion: shallowest depth k whose withdrawal of the image changes the output by at most "
                  f"{eta} nats (KL(baseline || cut) summed over the generated tokens, teacher-forced)")
    if not sweep:
        return Finding("vtw", "VTW depth", "unverified", "no sweep for this run", definition)
    refused = _not_a_withdrawal("vtw", "VTW depth", sweep, definition)
    if refused:
        return refused
    ds, depths, _ = _depth_rows(sweep)
    L = int(sweep["n_layers"])
    ok = [d["depth"] for d in ds if d["depth"] < L and _output_kl(d) <= eta]
    if not ok:
        worst = min((_output_kl(d) for d in ds if d["depth"] < L), default=float("nan"))
        return Finding("vtw", "VTW depth", "not found",
                       f"no depth below {L} meets output KL <= {eta} (smallest {worst:.3g} nats)", definition, None)
    k = min(ok)
    d = next(x for x in ds if x["depth"] == k)
    text = f"depth {k} (output KL {_output_kl(d):.2g} nats)"
    if not d.get("answer_kept", True):
        text += " — although the answer at that depth differs from the baseline's"
    return Finding("vtw", "VTW depth", "causal", text, definition, k)


def freeze_finding(sweep: dict | None) -> Finding | None:
    """A freeze sweep's own statement (None without one): from which layer frozen image states suffice."""
    if not sweep or sweep.get("mode") != "freeze":
        return None
    definition = ("shallowest depth k such that freezing the image tokens' states from decoder layer k on (every later"
                  " layer still reads the frozen states) keeps the answer at k and at every deeper depth")
    ds, depths, kept = _depth_rows(sweep)
    L = int(sweep["n_layers"])
    k, _ = cliff_from(depths, kept, None, L)
    pattern = kept_pattern(depths, kept)
    if k >= L:
        text = f"depth {L} (freeze): the answer needs the image states updated in every layer"
        if any(kept[:-1]):
            text += f" — but not monotonically: {pattern}"
    elif k == 0:
        text = ("depth 0 (freeze): the image states as they enter the decoder suffice; every layer still reads them,"
                " so this says nothing about withdrawing the image")
    else:
        text = f"depth {k} (freeze): frozen image states suffice from layer {k} on (the later layers still read them)"
        if not is_monotonic(depths, kept):
            text += f" — non-monotonic: {pattern}"
    return Finding("freeze", "frozen image states", "causal", text, definition, k,
                   {"pattern": pattern, "mode": "freeze"})



def sweep_statements(sweeps: dict) -> dict:
    """What the sweep figures state (keyword arguments of ``fig_sweep_modes``): the sweep cliff,
    read from the drop sweep (else remove; one sweep alone: that one, which says why when it is a
    freeze sweep), the mode it was read from, and the freeze depth. ``sweeps``: mode -> result or its JSON."""
    jsons = {m: (s.to_json() if hasattr(s, "to_json") else s) for m, s in sweeps.items() if s is not None}
    if len(jsons) == 1:
        only = next(iter(jsons.values()))
        return {"cliff": sweep_cliff_finding(only), "cliff_mode": only.get("mode", "drop"), "freeze": None}
    head = headline_sweep(jsons)
    return {"cliff": sweep_cliff_finding(head) if head else None, "cliff_mode": head.get("mode") if head else None,
            "freeze": freeze_finding(jsons.get("freeze"))}

def attention_cliff_finding(run, sweep_cliff: int | None) -> Finding:
    from .analysis.attention import attention_cliff_details

    definition = ("first decoder layer from which the last prompt token's attention share on the image stays below 25% "
                  "of its peak to the last layer (attention, not an intervention)")
    if "attention_to_image" not in run.arrays:
        return Finding("attention_cliff", "attention cliff", "unverified", "this run recorded no attention", definition)
    c = attention_cliff_details(run)
    status = "measured" if c.layer is not None else "not found"
    text = c.statement
    if sweep_cliff is not None and c.layer is not None:
        agree = abs(c.layer - sweep_cliff) <= 1
        text += f" — {'agrees' if agree else 'disagrees'} with the sweep cliff (depth {sweep_cliff})"
    elif sweep_cliff is not None:
        text += f" — the sweep cliff is depth {sweep_cliff}"
    return Finding("attention_cliff", "attention cliff", status, text, definition, c.layer)


def stabilisation_finding(run) -> Finding:
    from .analysis.stability import stabilisation

    definition = ("image tokens stable from decoder layer m when every layer from m on moves 90% of them by at most 5% "
                  "of their norm (relative step of each token's own state; rotation-invariant statistics never decide)")
    if "hidden_states" not in run.arrays or run.spans.n_image < 1:
        return Finding("stabilisation", "visual stabilisation", "unverified", "this run stored no image hidden states",
                       definition)
    if run.meta.get("interventions"):
        definition += "; in a run with interventions the image rows may be rewritten by them"
    s = stabilisation(run)
    return Finding("stabilisation", "visual stabilisation", "measured" if s.layer is not None else "not found",
                   s.statement, definition, s.layer, {"step_q": s.step_q, "step_median": s.step_median})


def functional_finding(substitution: dict | None, tau: float = DEFAULT_ETA) -> Finding:
    definition = (f"smallest grid layer i such that feeding layer i's image states to any later grid layer j keeps the "
                  f"answer (answer kept and output KL <= {tau} nats)")
    if not substitution:
        return Finding("functional", "functional stabilisation", "unverified", "no substitution matrix for this run",
                       definition)
    grid = substitution["layers"]
    akl = substitution.get("output_kl") or substitution.get("answer_kl") or substitution["kl"]
    kept = substitution["answer_kept"]
    n = len(grid)
    ok = lambda r, c: bool(kept[r][c]) and akl[r][c] is not None and akl[r][c] <= tau  # noqa: E731
    for c in range(n - 1):
        if all(ok(r, c) for r in range(c + 1, n)):
            later = ", ".join(str(grid[r]) for r in range(c + 1, n))
            return Finding("functional", "functional stabilisation", "causal",
                           f"layer {grid[c]}: its image states can replace those of layers {later} without changing "
                           "the answer", definition, grid[c])
    return Finding("functional", "functional stabilisation", "not found",
                   f"no layer of the grid {grid[:-1]} can stand in for every later one: each substitution into a later "
                   "layer changes the answer somewhere", definition, None)


def stages_finding(stages: dict | None) -> Finding:
    from .experiments.stages import STAGE_RULE

    if not stages:
        return Finding("stages", "three stages", "unverified",
                       "no knockout windows for this run (Attention tab: find the stages)", STAGE_RULE)
    if "undefined" in stages:
        return Finding("stages", "three stages", "unverified", f"not defined for this model: {stages['undefined']}",
                       STAGE_RULE)
    text = stages["statement"] + f" (tau {stages['tau']} nats)"
    return Finding("stages", "three stages", "causal", text, stages.get("rule", STAGE_RULE),
                   {"sink": stages.get("sink"), "fusion": stages.get("fusion"), "discard": stages.get("discard")})


def stages_proxy_finding(run) -> Finding | None:
    from .analysis.attention import stage_bands, three_stages

    if "attn_out" not in run.arrays:
        return None
    if "attention_layers" in run.meta:       # a hybrid stack: its linear layers have no attention output to read
        without = sorted(set(range(run.n_layers)) - set(run.meta["attention_layers"]))
        return Finding("stages_proxy", "three stages (cosine proxy)", "unverified", f"not defined for this model: "
                       f"decoder layers {without} have no softmax attention (a hybrid stack)", "VisiPruner's cosine rule")
    bands = stage_bands(three_stages(run))
    txt = " · ".join(f"{lab} {a}–{b}" if a != b else f"{lab} {a}" for lab, a, b in bands)
    return Finding("stages_proxy", "three stages (cosine proxy)", "proxy", txt,
                   "VisiPruner's cosine rule on how much the image turns the last token's attention output; "
                   "a stand-in for the knockout windows, which it can contradict", bands)


def compute_finding(sweep: dict | None, compute: dict | None) -> Finding:
    definition = ("decoder FLOPs and KV cache saved by removing the image tokens from the sweep cliff on; stated only "
                  "when a drop or remove sweep verified that depth (drop and remove give the same tokens)")
    if not sweep:
        return Finding("compute", "compute saved at the cliff", "unverified", "unverified (run the sweep)", definition)
    mode = sweep.get("mode", "drop")
    cliff = sweep_cliff_finding(sweep).value
    L = int(sweep["n_layers"])
    if mode not in ("drop", "remove"):
        return Finding("compute", "compute saved at the cliff", "unverified",
                       f"unverified: the sweep used {mode}, the saving is for removing the image; run a drop or remove"
                       " sweep", definition)
    if cliff is None or cliff >= L:
        return Finding("compute", "compute saved at the cliff", "causal",
                       "none: the answer needs the image in every layer (0% saved)", definition, 0.0)
    if not compute or cliff not in compute.get("depths", []):
        return Finding("compute", "compute saved at the cliff", "unverified",
                       f"depth {cliff} verified, but no compute estimate for this run (Compute tab)", definition)
    i = compute["depths"].index(cliff)
    text = (f"{compute['total_saving'][i]:.0%} of decoder FLOPs, {compute['kv_saving'][i]:.0%} of the KV cache "
            f"(remove from layer {cliff}, verified by the {mode} sweep)")
    if "measured_total_saving" in compute:
        text += f"; measured latency saving {compute['measured_total_saving'][i]:.0%}"
    return Finding("compute", "compute saved at the cliff", "causal", text, definition, compute["total_saving"][i])


def map_findings(checks: dict | None) -> list[Finding]:
    """One causal headline per map checked on the run (``extras["map_checks"]``: name -> MapCheck JSON)."""
    from .experiments.map_check import MapCheck

    definition = ("the map's top image tokens cut (deletion) or kept alone (insertion) through the lens; the output's "
                  "probability against random orders of the same tokens (p: the share of them doing as well)")
    return [Finding(f"map_check:{name}", f"map check: {name}", "causal", MapCheck(**d).statement, definition,
                    d["verdict"]) for name, d in (checks or {}).items()]


def findings(run, *, sweep: dict | None = None, extras: dict | None = None, truth: str | None = None,
             separator: str = DEFAULT_SEPARATOR) -> list[Finding]:
    """Every headline of a run, in the order the Overview shows them. ``sweep`` (any mode) joins the
    run's own sweeps (``extras``); the cliff, VTW and compute headlines read the drop/remove one."""
    extras = extras or {}
    truth = truth if truth is not None else run_truth(run)
    sweeps = sweeps_of(extras, sweep)
    # only a freeze sweep: the headlines below say they need a drop/remove one (never read it as one)
    head = headline_sweep(sweeps) or next(iter(sweeps.values()), None)
    out = []
    sc = sweep_cliff_finding(head)
    out += [truth_finding(run, truth, separator), sc, vtw_finding(head), freeze_finding(sweeps.get("freeze")),
            attention_cliff_finding(run, sc.value), stabilisation_finding(run),
            functional_finding(extras.get("substitution")), stages_finding(extras.get("stages")),
            stages_proxy_finding(run), compute_finding(head, extras.get("compute")),
            *map_findings(extras.get("map_checks"))]
    cross = run.meta.get("cross_attention_layers")
    if cross:     # (Mllama) read off image rows of the stream, which it has none of: not defined, said so
        why = (f"not defined for this model: it reads the image only by cross-attention (decoder layers {cross}), its "
               "sequence holds no image tokens")
        out = [Finding(f.key, f.title, "unverified", why, f.definition) if f is not None and f.key in (
            "attention_cliff", "stabilisation", "stages_proxy") else f for f in out]
    return [f for f in out if f is not None]
