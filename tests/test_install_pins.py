"""constraints.txt pins every requirement (torch aside: its CPU wheel is installed first) at a version the
ranges of requirements*.txt accept (and a few libraries they bring that decide behaviour: huggingface_hub,
pyarrow)."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lines(name):
    return [l.split("#")[0].strip() for l in (ROOT / name).read_text().splitlines() if l.split("#")[0].strip()]


def test_every_requirement_is_pinned_within_its_range():
    reqs = {canonicalize_name(r.name): r for r in map(Requirement, _lines("requirements.txt")
                                                      + _lines("requirements-dev.txt"))}
    pins = {}
    for line in _lines("constraints.txt"):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+]*)", line)
        assert m, f"not an exact pin: {line!r}"
        pins[canonicalize_name(m[1])] = m[2]
    needed = set(reqs) - {"torch"}
    assert needed <= set(pins), f"not pinned: {sorted(needed - set(pins))}"
    for name, version in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version, prereleases=True), (name, version, str(reqs[name].specifier))


def test_the_install_script_uses_the_pins():
    script = (ROOT / "scripts" / "install.sh").read_text()
    assert "-c constraints.txt" in script and '"${PIN[@]}" -r requirements.txt' in script
