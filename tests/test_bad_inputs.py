"""A bad-input matrix through the API (gradio_client against a live app on 127.0.0.1) and the
CLI (in process). Every case must give its own specific message; right after each, a normal
request succeeds, and the runs folder stays byte-identical."""
from __future__ import annotations

import hashlib
import socket
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from vlmlens.cli import main  # noqa: E402
from vlmlens.ui.inputs import EXAMPLES_DIR  # noqa: E402

EXAMPLE = str(EXAMPLES_DIR / "shapes_00.png")


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests._models import random_lm
    from vlmlens.cached import make_cached_runs
    from vlmlens.ui import build_demo

    lm = random_lm("llava")
    runs = tmp_path_factory.mktemp("runs")
    make_cached_runs(lm, runs, only=["single-color"], extras=False, log=lambda *_: None)
    demo = build_demo("random:llava", runs_dir=runs, default_run="single-color", loader=lambda *a, **k: lm)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue(default_concurrency_limit=4).launch(prevent_thread_lock=True, server_port=port, quiet=True)
    demo.dashboard.holder.wait(60)
    c = Client(f"http://127.0.0.1:{port}/", verbose=False)
    c.predict(handle_file(EXAMPLE), "What color is the circle?", 2, api_name="/capture")
    files = tmp_path_factory.mktemp("bad-files")
    (files / "junk.png").write_bytes(b"this is not a png")
    (files / "empty.png").write_bytes(b"")
    bomb_png(files / "bomb.png")
    yield c, runs, files
    demo.close()


API_CASES = [  # (endpoint, args, what the message must say)
    ("/capture", lambda f: (None, "What?", 3), "no image"),
    ("/capture", lambda f: (handle_file(EXAMPLE), "", 3), "prompt is empty"),
    ("/capture", lambda f: (handle_file(EXAMPLE), "   \n ", 3), "prompt is empty"),
    ("/capture", lambda f: (handle_file(EXAMPLE), "x" * 25_000, 3), "at most 20,000"),
    ("/capture", lambda f: (handle_file(EXAMPLE), "circle " * 1500, 3), "too long for this model"),
    ("/capture", lambda f: (handle_file(str(f / "junk.png")), "What?", 3), "junk.png: not a supported image"),
    ("/capture", lambda f: (handle_file(str(f / "bomb.png")), "What?", 3), "bomb.png"),
    ("/heatmap_layer", lambda f: (99, 0, "attention"), "layer 99 is out of range"),
    ("/heatmap_layer", lambda f: (-1, 0, "attention"), "layer -1 is out of range"),
    ("/heatmap_layer", lambda f: ("abc", 0, "attention"), "layer must be a finite number"),
    ("/heatmap_layer", lambda f: ("-Infinity", 0, "attention"), "finite number"),
    ("/heatmap_layer", lambda f: (1.5, 0, "attention"), "layer must be a whole number"),
    ("/heatmaps", lambda f: (0, 99, "attention"), "token 99 is out of range"),
    ("/heatmaps", lambda f: (0, 1.5, "attention"), "token must be a whole index"),
    ("/heatmaps", lambda f: (0, "x", "attention"), "token must be an index"),
    ("/heatmaps", lambda f: (0, "Infinity", "attention"), "token must be an index"),
    ("/heatmaps", lambda f: (0, 0, "bogus"), "'bogus' (type: <class 'str'>) is not in the list of choices"),
    ("/truncate", lambda f: ([], "drop"), "pick at least one depth"),
    ("/truncate", lambda f: (["99"], "drop"), "out of range"),
    ("/truncate", lambda f: ([""], "drop"), "empty depth"),
    ("/truncate", lambda f: (["abc"], "drop"), "must be an integer"),
    ("/truncate", lambda f: (["0"], "shrink"), "'shrink' (type: <class 'str'>) is not in the list of choices"),
    ("/load_run", lambda f: ("",), "pick a run"),
    ("/load_run", lambda f: ("../etc",), "invalid run name"),
    ("/load_run", lambda f: ("a/b",), "invalid run name"),
    ("/load_run", lambda f: ("nope",), "no run named 'nope'"),
    ("/save_run", lambda f: ("",), "type a name"),
    ("/save_run", lambda f: ("bad name!",), "invalid run name"),
    ("/save_run", lambda f: (".hidden",), "invalid run name"),
    ("/save_run", lambda f: ("single-color",), "already exists"),
    ("/token_map", lambda f: ("tsne",), "'tsne' (type: <class 'str'>) is not in the list of choices"),
    ("/switch_run", lambda f: ("not-mine",), "not one of this session's runs"),
]


@pytest.mark.parametrize("endpoint, args, want", API_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(API_CASES)])
def test_api_bad_input(live, endpoint, args, want):
    c, runs, files = live
    before = digest(runs)
    with pytest.raises(AppError) as e:
        c.predict(*args(files), api_name=endpoint)
    msg = str(e.value)
    assert want in msg, msg
    assert "/tmp/gradio" not in msg and "Traceback" not in msg
    c.predict(0, 0, "attention", api_name="/heatmap_layer")               # still serving this session
    assert digest(runs) == before


def _cli_cases(tmp: Path, runs: Path):
    (tmp / "afile").write_text("x")
    (tmp / "plain-dir").mkdir(exist_ok=True)
    (tmp / "plain-dir" / "x.txt").write_text("x")
    deep = tmp / "deep-run"
    deep.mkdir(exist_ok=True)
    for name in ("run.json", "arrays.safetensors", "image.png"):
        (deep / name).write_bytes(b"[" * 50_000 + b"]" * 50_000 if name == "run.json" else b"x")
    base = ["capture", "--model", "random:llava", "--prompt", "What?", "--image"]
    return [
        (["capture", "--model", "random:nope", "--image", EXAMPLE, "--prompt", "What?"], "unknown random family"),
        (base + [str(tmp / "missing.png")], "does not exist"),
        (base + [str(tmp)], "is a directory"),
        (base + ["/dev/zero"], "not a regular file"),
        (base + ["x" * 5000 + ".png"], "cannot use"),
        (base + [str(bomb_png(tmp / "bomb.png"))], "too large to decode safely"),
        (["capture", "--model", "random:llava", "--image", EXAMPLE, "--prompt", ""], "prompt is empty"),
        (["capture", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--max-new-tokens", "-1"],
         "between 0 and"),
        (["capture", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--out",
          str(tmp / "afile" / "sub")], "is a file"),
        (["capture", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--out",
          str(tmp / "plain-dir")], "is not a vlmlens run directory"),
        (["truncate", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--depths", "0,99"],
         "out of range"),
        (["truncate", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--mode", "shrink"],
         "unknown truncation mode"),
        (["show", str(tmp / "not-a-run")], "does not exist"),
        (["show", str(deep)], "nested too deeply"),
        (["stages", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--tau", "0"], "--tau must be"),
        (["sweep", "--model", "random:llava", "--image", EXAMPLE, "--prompt", "What?", "--out", str(tmp / "plain-dir")],
         "is not an earlier output"),
    ]


def test_cli_bad_inputs(tmp_path, capsys, live):
    _c, runs, _files = live
    before = digest(runs)
    cases = _cli_cases(tmp_path, runs)
    assert len(cases) + len(API_CASES) >= 40
    for argv, want in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and want in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "afile" / "sub").exists()
    assert main(["show", str(runs / "single-color")]) == 0                 # a normal command right after
    assert digest(runs) == before
