"""Dataset files that used to end in a traceback now give one clear message (#25 item 4): a
problem of the whole file is an InputError (the command line: one ``error:`` line, exit 2); a
problem of one row is that row's, skipped with its reason under ``--on-bad-row skip``."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from vlmlens.data import load_dataset
from vlmlens.errors import InputError


def _folder(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(d / "ok.png")
    return d


def _good(i):
    return {"id": f"g{i}", "image": "ok.png", "question": "What colour?", "answer": "red"}


def test_row_problems_are_skipped_with_their_reason(tmp_path):
    d = _folder(tmp_path)
    Image.new("1", (20000, 10000)).save(d / "huge.png")                  # 200 MP
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")
    lines = [json.dumps(_good(1)).encode(),
             b"[" * 100_000 + b"]" * 100_000,                              # nested 100,000 deep
             json.dumps(_good(2)).encode().replace(b"What colour?", b"Qu\xe9 color?"),   # Latin-1 bytes
             json.dumps(dict(_good(3), image="huge.png")).encode(),
             json.dumps(dict(_good(4), image="loop_a.png")).encode(),
             json.dumps(_good(5)).encode()]
    (d / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = load_dataset(d / "m.jsonl")
    assert [it.id for it in ds.items] == ["g1", "g5"]
    why = {b["row"]: b["reason"] for b in ds.skipped}
    assert why[2] == "JSON nested too deeply" and why[3].startswith("not UTF-8 text (byte 0xe9")
    assert why[4].startswith("image too large: huge.png") and "symlink loop" in why[5]
    with pytest.raises(InputError, match="row 2: JSON nested too deeply"):
        load_dataset(d / "m.jsonl", on_bad_row="fail")


def test_csv_rows_with_latin1_bytes_or_long_fields(tmp_path):
    d = _folder(tmp_path)
    long_q = "why " * 40_000                                               # 160,000 characters in one field
    text = ("id,image,question,answer\n" f"a,ok.png,What colour?,red\n" f"b,ok.png,{long_q},red\n").encode()
    text += "c,ok.png,Qué color?,red\n".encode("latin-1") + b"d,ok.png,Which?,red\n"
    (d / "m.csv").write_bytes(text)
    ds = load_dataset(d / "m.csv")
    assert [it.id for it in ds.items] == ["a", "b", "d"] and len(ds.items[1].prompt) > 131_072
    assert ds.skipped == [{"row": 4, "reason": "not UTF-8 text; save the file as UTF-8"}]


def _write(d, name, data):
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return d / name


def _loop(d):
    os.symlink("x.jsonl", d / "y.jsonl")
    os.symlink("y.jsonl", d / "x.jsonl")
    return d / "x.jsonl"


@pytest.mark.parametrize("make,msg", [
    (lambda d: _write(d, "m.parquet", b"PAR1 this is not parquet PAR1"), "is not a readable parquet file"),
    (lambda d: _write(d, "m.parquet", b""), "is not a readable parquet file"),
    (lambda d: _write(d, "m.json", json.dumps([_good(1), _good(2)])), "one JSON array; vlmlens reads JSONL"),
    (_loop, "cannot be opened"),
])
def test_file_problems_are_one_clear_error(tmp_path, make, msg):
    d = _folder(tmp_path)
    with pytest.raises(InputError, match=msg):
        load_dataset(make(d))


def test_a_damaged_saved_dataset_and_the_cli(tmp_path, capsys):
    import datasets

    from vlmlens.cli import main

    d = _folder(tmp_path)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"image": str(d / "ok.png"), "question": "What colour?", "answer": "red"}]).save_to_disk(
        str(saved))
    (saved / "state.json").write_text("{ garbage")
    with pytest.raises(InputError, match="is not a readable saved dataset"):
        load_dataset(saved)
    assert main(["study", "--data", str(saved), "--depths", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "not a readable saved dataset" in last and "Traceback" not in err
