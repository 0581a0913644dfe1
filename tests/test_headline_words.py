"""The Overview's headlines in a student's words: each line's question, and a sentence where two
lines may read as contradicting each other (the definitions stay on hover)."""
from pathlib import Path

from vlmlens.run_files import load_run, read_extras
from vlmlens.ui.panels import QUESTIONS, RECONCILE, headline_markdown
from vlmlens.ui.store import Derived, Entry

RUNS = Path(__file__).resolve().parents[1] / "cached_runs"


def _entry(name):
    return Entry("t", load_run(RUNS / name), name, f"saved:{name}", Derived(), read_extras(RUNS / name))


def test_every_headline_asks_its_question_and_contradictions_are_reconciled():
    md = headline_markdown(_entry("single-color"))
    for key in ("truth", "sweep_cliff", "vtw", "attention_cliff", "stabilisation"):
        assert QUESTIONS[key] in md, key
    assert 'title="' in md                                   # the precise definition on hover
    rows = [l for l in md.splitlines() if l.startswith("| <span")]
    assert all("<i>" in r for r in rows)
    # the shipped run holds knockout stages and a substitution matrix: both pairs are there, each reconciled
    assert "three stages (cosine proxy)" in md and "functional stabilisation" in md
    assert RECONCILE[0][2] in md and RECONCILE[1][2] in md


def test_no_reconciling_sentence_without_both_lines():
    e = _entry("single-color")
    e.extras = {}
    md = headline_markdown(e)
    assert RECONCILE[0][2] not in md                          # no knockout stages measured: nothing to reconcile
