"""One patch's numbers read off a shipped run: equal to the stored arrays cell by cell."""
from pathlib import Path

import numpy as np
import pytest

from vlmlens.analysis.patches import parse_cell, patch_numbers
from vlmlens.errors import InputError
from vlmlens.run_files import load_run

RUN = Path(__file__).resolve().parents[1] / "cached_runs" / "single-color"


def test_patch_numbers_equal_the_stored_arrays():
    run = load_run(RUN)
    r, c = 3, 5
    pn = patch_numbers(run, r, c, query_index=0)
    i = int(run.grid_index[r, c])
    att = run.attention_maps[:, 0]
    assert pn.token == i and pn.position == int(run.spans.image_positions[i]) and len(pn.rows) == run.n_layers
    for l, row in enumerate(pn.rows):
        assert row["attention"] == pytest.approx(float(att[l, i]))
        assert row["rank"] == int((att[l] > att[l, i]).sum()) + 1
        assert row["cam"] == pytest.approx(float(run.arrays["llava_cam"][l, i]))
        assert row["lens_prob"] == pytest.approx(float(run.arrays["patch_lens_probs"][l][i]))
        assert row["lens_token"] == run.meta["lens_vocab"][str(int(run.arrays["patch_lens_ids"][l][i]))]
    md = pn.table().markdown()
    assert "rank (1 = most)" in md and md.count("\n") == run.n_layers + 1
    assert parse_cell(" 2 ; 7", run.image_grid) == (2, 7)
    for bad in ("x", "1", "8, 0", "-1, 2"):
        with pytest.raises(InputError):
            parse_cell(bad, run.image_grid)
    with pytest.raises(InputError, match="query"):
        patch_numbers(run, 0, 0, query_index=np.int64(99))


def test_the_patch_lens_reads_layers_as_the_heatmap_does():
    """One reading of "layer": step l of the patch lens is the state decoder layer l reads; the last, the output."""
    from vlmlens.figures.heatmaps import fig_patch_lens

    run = load_run(RUN)
    steps = fig_patch_lens(run).layout.sliders[0].steps
    L = run.n_layers
    assert len(steps) == L + 1
    assert steps[0].label == "the state entering decoder layer 0" and steps[3].label == "the state entering decoder layer 3"
    assert steps[-1].label == f"the output (after layer {L - 1})"
    assert steps[2].args[1]["title.text"] == "Patch lens — the state entering decoder layer 2"
