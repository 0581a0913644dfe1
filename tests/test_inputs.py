"""Bad input: one clear message each, nothing half-written; odd images are converted."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import vlmlens as vl
from vlmlens.errors import InputError
from vlmlens.images import load_image

from tests._models import random_lm


def test_unknown_model_lists_supported():
    with pytest.raises(vl.UnsupportedModel, match="random:llava"):
        vl.load_model("random:nope")
    with pytest.raises(vl.UnsupportedModel, match="not a built-in name"):
        vl.load_model("/definitely/not/a/model/dir")


def test_unsupported_family_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(vl.UnsupportedModel, match=r"'bert'.*supported: .*llava.*qwen2_vl"):
        vl.load_model(str(tmp_path))


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(empty)
    junk = tmp_path / "junk.png"
    junk.write_text("this is not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(junk)
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="no image"):
        load_image(None)


def test_non_rgb_modes_are_converted_exactly(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    im, note = load_image(rgba)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and "composited" in note
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert load_image(half)[0].getpixel((0, 0)) == (127, 127, 127)
    gray = Image.new("L", (3, 3), 77)
    assert load_image(gray)[0].getpixel((1, 1)) == (77, 77, 77)
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(cmyk)[0].getpixel((0, 0)) == (255, 0, 0)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    assert load_image(deep)[0].getpixel((0, 0)) == (255, 255, 255)
    p = tmp_path / "g16.png"
    deep.save(p)
    assert load_image(p)[0].getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    """A photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view"):
    stored 20x10 with red on the left and blue on the right, it is viewed 10x20 with red on top."""
    a = np.zeros((10, 20, 3), dtype=np.uint8)
    a[:, :10] = (255, 0, 0)
    a[:, 10:] = (0, 0, 255)
    stored = Image.fromarray(a)
    exif = stored.getexif()
    exif[0x0112] = 6
    p = tmp_path / f"phone.{fmt}"
    stored.save(p, exif=exif.tobytes(), **({"quality": 95} if fmt == "jpeg" else {}))
    im, note = load_image(p)
    assert im.size == (10, 20) and "orientation 6" in note
    top, bottom = np.asarray(im)[3, 5].astype(int), np.asarray(im)[16, 5].astype(int)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    with Image.open(p) as opened:  # the same for an opened PIL image
        assert load_image(opened)[0].size == (10, 20)
    plain = tmp_path / f"plain.{fmt}"
    stored.save(plain)
    im2, note2 = load_image(plain)
    assert im2.size == (20, 10) and note2 is None


def test_arrays():
    assert load_image(np.zeros((2, 3), np.uint8))[0].size == (3, 2)
    assert load_image(np.ones((2, 2, 3), np.float32))[0].getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2), 3.0))


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_empty_prompt(image, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        vl.capture(random_lm("llava"), image, prompt)


@pytest.mark.parametrize("n", [-1, 100000, 2.5, True])
def test_bad_max_new_tokens(image, n):
    with pytest.raises(InputError, match="max_new_tokens"):
        vl.capture(random_lm("llava"), image, "What is this?", max_new_tokens=n)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmlens", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_capture_and_show(tmp_path, image):
    img = tmp_path / "x.png"
    image.save(img)
    out = tmp_path / "runs" / "x"
    r = _cli("capture", "--model", "random:llava", "--device", "cpu", "--image", str(img), "--prompt", "What is this?",
             "--max-new-tokens", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "llava" in r.stdout and f"saved:      {out}" in r.stdout and "generated 3" in r.stdout
    run = vl.load_run(out)
    assert len(run.generated_tokens) <= 3 and run.meta["model"] == "random:llava"
    s = _cli("show", str(out))
    assert s.returncode == 0 and run.generated_text in s.stdout


def test_cli_prints_no_deprecation_notices(tmp_path, image):
    """A truncation (prefix reuse passes the cache to generate) prints its table, not transformers'
    FutureWarnings about renamed arguments."""
    img = tmp_path / "x.png"
    image.save(img)
    r = _cli("truncate", "--model", "random:llava", "--device", "cpu", "--image", str(img), "--prompt", "What is this?",
             "--depths", "1", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "output KL" in r.stdout and "FutureWarning" not in r.stderr, r.stderr[-2000:]


def test_cli_one_registry_for_every_command():
    """Plugin modules register into vlmlens.cli; ``python -m vlmlens`` must see the same set
    (it once ran the registry as a second ``__main__`` module object)."""
    import vlmlens.cli as cli

    cli.build_parser()
    expected = {"capture", "show", "truncate", "sweep", "study", "make-cached-runs"}
    assert expected <= set(cli.COMMANDS)
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert sorted(listed) == sorted(cli.COMMANDS)


@pytest.mark.parametrize("case", ["zero-byte", "out-not-run", "bad-model", "bad-tokens", "empty-prompt"])
def test_cli_bad_input_exit_2(tmp_path, image, case):
    img = tmp_path / "x.png"
    image.save(img)
    args = {"image": str(img), "prompt": "What?", "model": "random:llava", "out": str(tmp_path / "new"), "n": "2"}
    if case == "zero-byte":
        (tmp_path / "z.png").write_bytes(b"")
        args["image"] = str(tmp_path / "z.png")
    elif case == "out-not-run":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("keep")
        args["out"] = str(tmp_path / "docs")
    elif case == "bad-model":
        args["model"] = "random:unknown"
    elif case == "bad-tokens":
        args["n"] = "-3"
    elif case == "empty-prompt":
        args["prompt"] = " "
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = _cli("capture", "--model", args["model"], "--device", "cpu", "--image", args["image"], "--prompt", args["prompt"],
             "--max-new-tokens", args["n"], "--out", args["out"])
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
