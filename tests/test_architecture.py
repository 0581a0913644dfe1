"""The house's shape: no import circle, no import up the floors (scripts/import_graph.py), a
command line that starts without torch, and one table type for every printed result."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmlens.tables import Table, fixed, percent, rows_csv

ROOT = Path(__file__).resolve().parents[1]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_circle_and_no_upward_import():
    g = _graph_module()
    edges = g.graph()
    assert len(edges) > 100                          # every module of vlmlens/ was read
    assert "experiments.engine" in edges["cli.experiments"]     # imported inside functions only: still counted
    assert g.unresolved(edges) == []                         # every vlmlens import names a module that exists
    assert g.circles(edges) == []
    assert g.upward(edges) == []


def test_the_checker_finds_circles_and_climbs():
    g = _graph_module()
    fake = {"run": {"findings"}, "findings": {"experiments.engine"}, "experiments.engine": {"run"},
            "errors": set(), "cli": {"errors"}}
    assert g.circles(fake) == [["experiments.engine", "findings", "run"]]
    assert ("run", "findings") in g.upward(fake)          # base floor importing the headlines floor
    assert ("cli", "errors") not in g.upward(fake)          # down is fine
    assert g.unresolved({"cli": {"ui.experiments"}, "errors": set()}) == [("cli", "ui.experiments")]


def test_help_and_import_do_not_load_torch():
    code = ("import sys, io, contextlib\nimport vlmlens\nfrom vlmlens.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'capture' in buf.getvalue() and 'serve' in buf.getvalue(), buf.getvalue()\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_every_commands_help_prints_without_torch():
    """Each command's --help (its options read the library's vocabulary: modes, tau, method syntax)."""
    code = ("import sys, io, json, contextlib\nfrom vlmlens.cli import COMMANDS, main\nbad = []\n"
            "for name in COMMANDS:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            main([name, '--help'])\n        except SystemExit as e:\n"
            "            if e.code not in (0, None): bad.append(name)\n"
            "    if 'usage: python -m vlmlens ' + name not in buf.getvalue(): bad.append(name)\n"
            "print(json.dumps([sorted(COMMANDS), bad, 'torch' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    names, bad, torch = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(names) >= 12 and "prune" in names and "serve" in names
    assert bad == [] and torch is False


def test_the_package_keeps_capture_a_function():
    import vlmlens as vl
    import vlmlens.capture  # noqa: F401  (the submodule of the same name)

    assert callable(vl.capture) and vl.capture.__module__ == "vlmlens.capture"
    from vlmlens import capture

    assert capture is vl.capture
    with pytest.raises(AttributeError):
        vl.no_such_name


def test_table_markdown_csv_json():
    t = Table(["name", "rate", "kl"], [{"name": "a|b", "rate": 0.5, "kl": None}, ["c", float("nan"), 1.23456]],
              headers=["name", "rate (%)", "KL"], formats={"rate": percent, "kl": fixed(2)})
    assert t.markdown() == ("| name | rate (%) | KL |\n|---|---|---|\n| a\\|b | 50% | – |\n| c | – | 1.23 |")
    assert t.csv().splitlines() == ["name,rate,kl", "a|b,0.5,", "c,nan,1.23456"]
    assert t.to_json()[0] == {"name": "a|b", "rate": 0.5, "kl": None}
    assert rows_csv([{"x": 1, "y": None, "z": 3}], ["y", "x"]).splitlines() == ["y,x", ",1"]


def test_table_pivot():
    rows = [{"task": "vqa", "k": 0, "v": 0.25}, {"task": "vqa", "k": 2, "v": 1.0}, {"task": "cap", "k": 0, "v": 0.5},
            {"task": "vqa", "k": 0, "v": 0.99}]                       # a second match: the first one counts
    t = Table.pivot(rows, row="task", col="k", value="v", row_keys=["vqa", "cap"], col_keys=[0, 2], corner="task",
                    col_label=lambda k: f"k={k}", fmt_for=lambda task: fixed(3) if task == "cap" else percent)
    assert t.markdown() == "| task | k=0 | k=2 |\n|---|---|---|\n| vqa | 25% | 100% |\n| cap | 0.500 | – |"
    with pytest.raises(ValueError):
        Table(["a", "b"], headers=["only one"])
