"""Sweeps in several modes never overwrite a headline (#24 part 4).

The sweep cliff, the VTW depth and the compute saved are defined on a sweep that withdraws the
image (drop / remove); a freeze sweep -- the frozen image is still read by every later layer --
is its own statement. Each mode's sweep is kept, drawn side by side, saved and exported.
"""
from __future__ import annotations

import csv
import shutil

import pytest

from vlmlens import findings as F
from vlmlens.run_files import sweeps_of
from vlmlens.ui.inputs import EXAMPLES_DIR

EXAMPLE = str(EXAMPLES_DIR / "shapes_00.png")


def _sweep(mode: str, kept: list[bool], kls: list[float], L: int = 4) -> dict:
    return {"mode": mode, "n_layers": L, "prompt": "p", "baseline_text": "yes", "baseline_tokens": ["yes"],
            "depths": [{"depth": k, "answer_kept": kp, "output_kl": kl, "first_token_kl": kl, "tokens": ["yes"],
                        "text": "yes"} for k, (kp, kl) in enumerate(zip(kept, kls))]}


DROP = _sweep("drop", [False, False, True, True, True], [3.0, 1.0, 0.05, 0.0, 0.0])
FREEZE = _sweep("freeze", [True] * 5, [0.0] * 5)


def _by_key(fs):
    return {f.key: f for f in fs}


def test_a_freeze_sweep_is_never_read_as_a_cliff():
    only_freeze = F.sweep_cliff_finding(FREEZE)
    assert only_freeze.status == "unverified" and "drop or remove" in only_freeze.text and only_freeze.value is None
    assert "never reads the image" not in only_freeze.text
    assert F.vtw_finding(FREEZE).status == "unverified" and F.vtw_finding(FREEZE).value is None
    assert F.compute_finding(FREEZE, {"depths": [0], "total_saving": [0.9], "kv_saving": [0.9]}).status == "unverified"
    fz = F.freeze_finding(FREEZE)
    assert fz.value == 0 and "(freeze)" in fz.text and "says nothing about withdrawing the image" in fz.text
    drop = F.sweep_cliff_finding(DROP)
    assert drop.value == 2 and "depth 2 (drop)" in drop.text and F.vtw_finding(DROP).value == 2


def test_findings_read_the_cliff_from_drop_whatever_the_order():
    for extras in ({"sweeps": {"drop": DROP, "freeze": FREEZE}}, {"sweeps": {"freeze": FREEZE, "drop": DROP}},
                   {"sweep": DROP, "sweeps": {"freeze": FREEZE}}):
        sweeps = sweeps_of(extras)
        head = F.headline_sweep(sweeps)
        fs = _by_key([F.sweep_cliff_finding(head), F.vtw_finding(head), F.freeze_finding(sweeps["freeze"])])
        assert fs["sweep_cliff"].value == 2 and fs["vtw"].value == 2 and fs["freeze"].value == 0
    # given directly as ``sweep=``, a freeze sweep joins the run's sweeps under its own mode
    assert set(sweeps_of({"sweeps": {"drop": DROP}}, FREEZE)) == {"drop", "freeze"}
    assert F.headline_sweep({"freeze": FREEZE}) is None
    assert F.headline_sweep({"remove": _sweep("remove", [True] * 5, [0.0] * 5), "drop": DROP}) is DROP


def test_the_sweep_figures_state_what_the_findings_say():
    """Figures draw, findings decide: the caller's statements become the marks and the subtitle."""
    from vlmlens.experiments.compare import TruncationResult
    from vlmlens.figures.experiments import fig_sweep_modes, fig_truncation_sweep
    from vlmlens.ui.experiment_views import _figure_of

    def full(s):                     # the fields a saved sweep has that the findings do not read
        more = {"token_ids": [1], "first_divergence": None, "edit_distance": 0, "baseline_logprob": 0.0,
                "own_logprob": 0.0, "answer": "yes", "text_kept": True}
        top = {"model": "m", "family": "llava", "image_sha256": "0", "max_new_tokens": 1, "separator": "answer:",
               "reuse": True, "baseline_token_ids": [1], "baseline_logprob": 0.0, "baseline_answer": "yes"}
        return {**top, **s, "depths": [{**more, **d} for d in s["depths"]]}

    st = F.sweep_statements({"freeze": FREEZE, "drop": DROP})
    assert st["cliff"].value == 2 and st["cliff_mode"] == "drop" and st["freeze"].value == 0
    objs = {m: TruncationResult.from_json(full(s)) for m, s in (("drop", DROP), ("freeze", FREEZE))}
    fig = fig_sweep_modes(objs, **st)
    marks = [a.text for a in fig.layout.annotations]
    assert "sweep cliff 2 (drop)" in marks and "freeze 0" in marks
    assert [s.x0 for s in fig.layout.shapes if s.type == "line"] == [2, 2, 0, 0]
    assert [a.text for a in _figure_of({"drop": full(DROP), "freeze": full(FREEZE)}, fig_sweep_modes, "t").layout.annotations
            if "cliff" in (a.text or "")] == ["sweep cliff 2 (drop)"]
    # no statements given: no marks (a figure never decides one itself)
    assert not [a for a in fig_sweep_modes(objs).layout.annotations if "cliff" in (a.text or "")]
    # one freeze sweep alone: its own figure, subtitled with why it states no cliff
    one = F.sweep_statements({"freeze": FREEZE})
    sub = fig_truncation_sweep(objs["freeze"], cliff=one["cliff"]).layout.title.text
    assert "drop or remove" in sub and not [s for s in fig_truncation_sweep(objs["freeze"], cliff=one["cliff"]).layout.shapes
                                            if s.type == "line" and s.line.color == "#CC79A7"]
    with pytest.raises(TypeError, match="result object"):
        fig_truncation_sweep(DROP)
    # a cliff at depth L is "no cut keeps the answer", never "cut at L", in both figures, as the headline says
    never = _sweep("drop", [False] * 4 + [True], [1.0] * 4 + [0.0])
    st = F.sweep_statements({"drop": never})
    assert st["cliff"].value == 4 and "needs the image in every layer" in st["cliff"].text
    obj = TruncationResult.from_json(full(never))
    for f in (fig_truncation_sweep(obj, cliff=st["cliff"]), fig_sweep_modes({"drop": obj}, **st)):
        labels = [a.text for a in f.layout.annotations if "cliff" in (a.text or "")]
        assert len(labels) == 1 and labels[0].startswith("sweep cliff none: no cut keeps the answer"), labels


@pytest.fixture(scope="module")
def dash():
    from vlmlens.ui.callbacks import Dashboard

    d = Dashboard(model="tiny-shapes", runs_dir=None)
    d.holder.wait(60)
    return d


def test_dashboard_keeps_every_mode_and_headlines_come_from_drop(dash, tmp_path):
    from vlmlens.ui import exports, panels
    from vlmlens.ui.callbacks import new_session
    from vlmlens.ui.store import RunsDir

    sess, *_ = dash.capture(EXAMPLE, "What color is the circle?", 2, new_session())
    for mode in ("drop", "remove", "freeze"):                 # the order of the issue's report
        gens, fig, _pert, _enc, headline = dash.sweep(sess, mode)
        assert f"mode <code>{mode}</code>" in gens              # the table shows the sweep just run
    entry = dash.entry(sess)
    sweeps = entry.sweeps
    assert set(sweeps) == {"drop", "remove", "freeze"} and all(s["mode"] == m for m, s in sweeps.items())
    drop = sweeps["drop"]
    want = F.sweep_cliff_finding(drop)
    fs = _by_key(panels.run_findings(entry))
    assert fs["sweep_cliff"].text == want.text and "(drop)" in fs["sweep_cliff"].text
    assert fs["vtw"].text == F.vtw_finding(drop).text
    assert fs["freeze"].text == F.freeze_finding(sweeps["freeze"]).text and "(freeze)" in fs["freeze"].text
    assert "(freeze)" not in fs["sweep_cliff"].text and "(freeze)" not in fs["vtw"].text
    assert "frozen image states" in headline and want.text.split(":")[0] in headline
    # one figure, the three modes side by side
    names = {t.name for t in fig.data if t.name}
    assert {"drop: output KL", "remove: output KL", "freeze: output KL"} <= names
    # saved and opened again: the three sweeps, one file each
    runs = RunsDir(tmp_path / "runs")
    runs.save("three-modes", entry.run, entry.extras)
    assert sorted(p.name for p in (tmp_path / "runs" / "three-modes").glob("sweep*.json")) == [
        "sweep-drop.json", "sweep-freeze.json", "sweep-remove.json"]
    _run, _derived, extras = runs.open("three-modes")
    assert set(sweeps_of(extras)) == {"drop", "remove", "freeze"}
    assert _by_key(F.findings(_run, extras=extras))["sweep_cliff"].text == want.text
    # the CSV export: every mode's rows with the mode and the output KL
    rows = list(csv.DictReader(open(exports.metrics_csv(entry, tmp_path))))
    got = {(r["metric"], r["mode"]) for r in rows if r["metric"].startswith("sweep_")}
    assert {("sweep_output_kl", m) for m in sweeps} <= got and {("sweep_answer_kept", m) for m in sweeps} <= got
    kl0 = next(float(r["value"]) for r in rows if r["metric"] == "sweep_output_kl" and r["mode"] == "drop"
               and r["layer"] == "0")
    assert kl0 == pytest.approx(drop["depths"][0]["output_kl"])


def test_a_run_saved_with_one_older_sweep_json_still_opens(tmp_path):
    """Runs saved before sweeps per mode hold one sweep.json (any mode): read under its mode."""
    import json

    from vlmlens.run_files import read_extras

    d = tmp_path / "old"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps(FREEZE))
    ex = read_extras(d)
    assert set(ex["sweeps"]) == {"freeze"} and F.headline_sweep(sweeps_of(ex)) is None
    shutil.rmtree(d)
