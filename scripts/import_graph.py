"""The import graph of vlmlens/: circles and imports that run up the floors.

    python scripts/import_graph.py            # circles, upward imports, then the edges per module
    python scripts/import_graph.py --check    # exit 1 when there is a circle or an upward import

Every ``import`` counts, at module level or inside a function: a lazy import that climbs a floor
is still a dependency a reader has to follow. Floors (ARCHITECTURE.md draws them) go from the
bottom up; a module may import its own floor and those below, never one above. Within a floor
the only rule is: no circle.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vlmlens"

# Bottom to top. A module belongs to the first floor whose prefix matches its dotted name.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("_version", "errors", "images", "rows", "tables", "schedule", "vocabulary", "run")),
    ("models", ("models", "video", "tiny.scenes", "tiny.tasks", "tiny.tokenizer", "tiny.model")),
    ("lens", ("lens", "lens_attention", "lens_injections", "session", "recorder", "decoding_rows", "generation",
              "interventions")),
    ("capture", ("capture", "run_files")),
    ("measures", ("analysis", "metrics", "data")),
    ("studies", ("experiments", "tiny", "real")),
    ("headlines", ("findings",)),
    ("figures", ("figures",)),
    ("surfaces", ("cached", "ui", "cli", "__main__", "__init__")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise SystemExit(f"import_graph: {module} is on no floor; add it to FLOORS")
    return best


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        if not (node.module or "").startswith("vlmlens"):
            return []
        base = node.module.split(".")[1:]
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        if module == "__init__":
            pkg = []
        base = pkg[: len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    names = []
    for alias in node.names:
        cand = ".".join(base + [alias.name])
        names.append(cand if (ROOT / Path(*cand.split("."))).with_suffix(".py").exists()
                     or (ROOT / Path(*cand.split("."))).is_dir() else ".".join(base))
    return [n for n in names if n]


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        out: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out.update(_resolve(mod, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                out.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("vlmlens."))
        out.discard(mod)
        # importing a submodule of your own package does not import the package's __init__ upwards
        edges[mod] = out
    return edges


def unresolved(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of vlmlens modules that do not exist (a relative import one dot short, a module moved)."""
    return [(a, b) for a, targets in sorted(edges.items()) for b in sorted(targets) if b not in edges]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _is_ancestor_package(a: str, b: str) -> bool:
    """b is a package that contains a (importing it loads only b's __init__)."""
    return a.startswith(b + ".")


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if b in edges and not _is_ancestor_package(a, b) and floor_of(b) > floor_of(a):
                bad.append((a, b))
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    edges = graph()
    cyc = circles(edges)
    up = upward(edges)
    missing = unresolved(edges)
    for a, b in missing:
        print(f"unresolved: {a} imports {b}, which is no module of vlmlens")
    for c in cyc:
        print("circle:", " <-> ".join(c))
    for a, b in up:
        print(f"upward: {a} ({FLOORS[floor_of(a)][0]}) -> {b} ({FLOORS[floor_of(b)][0]})")
    if not args.check:
        for a in sorted(edges):
            print(f"{a} [{FLOORS[floor_of(a)][0]}]: {', '.join(sorted(edges[a])) or '-'}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
          f"{len(cyc)} circles, {len(up)} upward imports, {len(missing)} unresolved")
    return 1 if (args.check and (cyc or up or missing)) else 0


if __name__ == "__main__":
    sys.exit(main())
