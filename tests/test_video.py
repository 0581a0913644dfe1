"""Video input (#26): frames read with PyAV, processed without torchvision, captured through the one
lens, each statement checked against a known answer or an eager reference.

Known answers: a file whose frame i is painted gray level 12 * i gives back the frames sampled; a
video of one repeated frame is exactly the image (same patches, same hidden states); a capture of a
video equals plain forwards and eager attention; Truncate of all video tokens or of chosen temporal
slots equals an eager forward with that key mask written by hand (or those rows sliced out)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmlens as vl
from vlmlens.analysis.attention import frame_attention
from vlmlens.capture import capture, image_positions, prepare_inputs
from vlmlens.errors import InputError
from vlmlens.interventions import Truncate
from vlmlens.lens import NOTHING, Lens, Plan
from vlmlens.models.families import get_arch
from vlmlens.models.tiny_random import FAMILIES
from vlmlens.video import MAX_FRAMES, Video, load_video, sample_indices

from tests._models import random_lm, record_matrix
from tests.test_capture import assert_capture_exact
from tests.test_family_matrix import TOL, _check, _eager_logits, deep, matrix_row

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
#: every family whose video the lens reads: Qwen3-VL's (DeepStack, timestamps between the slots) and Qwen3.5's
#: (hybrid) too
ALL_VIDEO = tuple(f for f in FAMILIES if get_arch(f).video)
PROMPT = "What happens in the video?"


def _write_video(path, n=20, fps=10, size=(48, 32)):
    """An MPEG-4 file whose frame i is a flat gray of level 12 * i."""
    import av

    w, h = size
    with av.open(str(path), mode="w") as box:
        stream = box.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 12 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip():
    """Six random frames (three temporal slots of two), without a frame rate."""
    rng = np.random.default_rng(1)
    return load_video(rng.integers(0, 256, (6, 40, 56, 3), dtype=np.uint8), frames=6)


def test_a_file_gives_back_the_frames_sampled_evenly(tmp_path):
    v = load_video(_write_video(tmp_path / "ramp.mp4"), frames=4)
    assert v.indices == (0, 6, 13, 19) == tuple(sample_indices(20, 4))
    assert v.fps == pytest.approx(10.0) and v.n_source == 20
    assert v.times == pytest.approx([0.0, 0.6, 1.3, 1.9])
    levels = [float(np.asarray(f).mean()) for f in v.frames]
    # the sampled frames, not their neighbours (levels 12 apart; the codec's YUV round trip moves them < 6)
    assert [int(np.argmin([abs(x - 12 * j) for j in range(20)])) for x in levels] == list(v.indices)
    assert v.size == (48, 32)
    assert load_video(tmp_path / "ramp.mp4", frames=50).indices == tuple(range(20))   # fewer frames than asked


def test_bad_video_input_gets_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_video(tmp_path / "none.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    (tmp_path / "fake.mp4").write_bytes(b"not a video at all" * 100)
    with pytest.raises(InputError, match="cannot read"):
        load_video(tmp_path / "fake.mp4")
    with pytest.raises(InputError, match=f"1..{MAX_FRAMES}"):
        load_video(tmp_path / "still.png", frames=MAX_FRAMES + 1)
    with pytest.raises(InputError, match="uint8"):
        load_video(np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(InputError, match="share one size"):
        load_video([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 6, 3), np.uint8)])
    with pytest.raises(InputError, match="reads images only"):
        capture(random_lm("llava"), load_video([np.zeros((8, 8, 3), np.uint8)] * 2), PROMPT)
    with pytest.raises(InputError, match="non-empty list of slot numbers"):
        Truncate(1, frames=[])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_still_video_is_exactly_the_image(family, image):
    """Two copies of one frame fill one temporal slot: the processor gives the image's own patches and
    the model the image's hidden states (the placeholders differ, their features and positions do not)."""
    lm = random_lm(family)
    still = load_video([image, image], frames=2)
    vin, _, _ = prepare_inputs(lm, still, PROMPT)
    iin, _, _ = prepare_inputs(lm, image, PROMPT)
    assert torch.equal(vin["pixel_values_videos"], iin["pixel_values"])
    assert vin["video_grid_thw"].tolist() == iin["image_grid_thw"].tolist()
    a = capture(lm, still, PROMPT, max_new_tokens=2, hidden_dtype="float32")
    b = capture(lm, image, PROMPT, max_new_tokens=2, hidden_dtype="float32")
    assert a.spans.positions("image").tolist() == b.spans.positions("image").tolist()
    assert np.abs(a.hidden_states - b.hidden_states).max() <= 1e-5
    assert a.generated_text == b.generated_text
    assert a.meta["video"]["slots"] == 1 and "video" not in b.meta


@pytest.mark.parametrize("family", ALL_VIDEO)
def test_video_capture_matches_plain_model(family, clip):
    lm = random_lm(family)
    run = assert_capture_exact(lm, clip)
    meta = run.meta["video"]
    assert meta["slots"] == 3 and meta["frames_per_slot"] == 2 and meta["indices"] == [0, 1, 2, 3, 4, 5]
    # one raster per temporal slot, laid out as the contact sheet the run keeps as its image
    inputs, _, _ = prepare_inputs(lm, clip, PROMPT)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    per = h * w // 4
    assert run.spans.n_image == t * per and run.meta["grid_order"] == "frames"
    if family.startswith("qwen3"):            # each slot its own <|vision_start|> ... <|vision_end|>, after its time
        assert isinstance(run.spans.image, list) and [s.stop - s.start for s in run.spans.image] == [per] * 3
    assert run.image.size == (3 * w * 8, h * 8)          # three cells of the processed frame size (patch 8)
    gi = run.grid_index
    assert gi.shape == (h // 2, 3 * w // 2)
    for s in range(3):
        assert sorted(gi[:, s * (w // 2):(s + 1) * (w // 2)].ravel()) == list(range(s * per, (s + 1) * per))


def test_frame_shares_sum_to_the_share_of_the_video(clip):
    run = capture(random_lm("qwen2_vl"), clip, PROMPT, max_new_tokens=2, hidden_dtype="float32")
    shares = frame_attention(run)
    assert shares.shape == (run.n_layers, 3)
    total = run.attention_to_image[:, :, run.spans.n_prompt - 1].mean(1)      # head mean, the last prompt token
    assert np.abs(shares.sum(1) - total).max() <= 1e-5
    # and each slot's share is its own tokens' attention in the maps
    per = run.spans.n_image // 3
    maps = run.attention_maps[:, 0]
    assert np.allclose(shares[:, 1], maps[:, per:2 * per].sum(1), atol=1e-6)
    with pytest.raises(InputError, match="not a video run"):
        frame_attention(capture(random_lm("qwen2_vl"), clip.frames[0], PROMPT, max_new_tokens=0))


def test_a_video_run_round_trips_through_its_files(clip, tmp_path):
    run = capture(random_lm("qwen2_vl"), clip, PROMPT, max_new_tokens=1)
    vl.save_run(run, tmp_path / "r")
    back = vl.load_run(tmp_path / "r")
    assert back.meta["video"] == run.meta["video"] and back.image.size == run.image.size
    assert np.array_equal(back.grid_index, run.grid_index)


def _slot_positions(lm, inputs, slots):
    img = image_positions(lm, inputs["input_ids"])
    per = len(img) // int(inputs["video_grid_thw"][0][0])
    return np.concatenate([img[s * per:(s + 1) * per] for s in slots])


@pytest.mark.parametrize("family", ALL_VIDEO)
def test_truncating_chosen_frames_equals_eager_references(family, clip):
    """Truncate(k, frames=[1]): from layer k no text query reads slot 1's keys (drop), or slot 1's rows
    leave the sequence (remove); slots 0 and 2 stay readable. References: eager forwards with that
    mask written by hand, or those rows sliced out of every layer's inputs."""
    lm = deep(family)
    inputs, _, _ = prepare_inputs(lm, clip, PROMPT)
    n, k, L = inputs["input_ids"].shape[1], 1, lm.n_layers
    img = image_positions(lm, inputs["input_ids"])
    is_img = np.zeros(n, bool)
    is_img[img] = True
    cut = np.zeros(n, bool)
    cut[_slot_positions(lm, inputs, [1])] = True
    text = np.flatnonzero(~is_img)

    def lens(ivs):
        plan = Plan.build(img, L, n, NOTHING, ivs, frames=3)
        with torch.no_grad(), Lens.for_model(lm, plan):
            return lm.model(**inputs).logits[0].double()

    label = f"{family} video"
    if get_arch(family).injections:      # DeepStack: its added features are the whole video's, refused with why
        for mode in ("drop", "remove"):
            with pytest.raises(InputError, match="DeepStack"):
                lens([Truncate(k, mode, frames=[1])])
            record_matrix(label, f"Truncate({k}, {mode}, frames [1])", True,
                          "refused: DeepStack's added features are cut for the whole video or not at all", refused=True)
        return
    block = (~is_img)[:, None] & cut[None, :]
    att = set(lm.arch.attention_layers(lm.model))
    if set(range(k, L)) <= att:
        ref = _eager_logits(lm, inputs, block=lambda l: block if l >= k else None)
        _check(label, f"Truncate({k}, drop, frames [1])", lens([Truncate(k, frames=[1])]), ref, text)
    else:                                # a hybrid stack: no key mask on its linear layers
        with pytest.raises(InputError, match="no softmax attention"):
            lens([Truncate(k, frames=[1])])
        record_matrix(label, f"Truncate({k}, drop, frames [1])", True,
                      f"refused: no softmax attention at layer {min(set(range(k, L)) - att)}", refused=True)
    ref = _eager_logits(lm, inputs, remove=(k, ~cut))
    mine = lens([Truncate(k, "remove", frames=[1])])
    _check(label, f"Truncate({k}, remove, frames [1])", mine, ref, np.arange(n - int(cut.sum())))
    # cutting one slot is not cutting the video: the answer can tell them apart
    everything = lens([Truncate(k, "remove")])
    assert float((everything[-1] - mine[-1]).abs().max()) > TOL
    with pytest.raises(InputError, match="3 temporal slots"):
        Plan.build(img, L, n, NOTHING, [Truncate(k, frames=[3])], frames=3)


@pytest.mark.parametrize("family", ALL_VIDEO)
def test_every_intervention_on_a_video_equals_its_eager_reference(family, clip):
    """The family matrix's row for a video input (Truncate of all video tokens, Knockout, Freeze,
    Substitute, FastV over the video tokens), recorded as the row "<family> video"."""
    matrix_row(family, f"{family} video", clip)


@pytest.mark.parametrize("family", ALL_VIDEO)
def test_a_batch_of_videos_equals_one_video_at_a_time(family, clip):
    """Videos of 6 and 4 frames (different token counts: padding happens), batched."""
    from vlmlens.experiments.batch import BatchError, BatchTrial

    from tests.test_batch import _check_equal

    short = load_video(list(clip.frames[:4]), frames=4)
    items = [(clip, PROMPT), (short, "And then, what happens next?")]
    lm = random_lm(family)
    if len(lm.arch.attention_layers(lm.model)) < lm.n_layers:         # a hybrid stack: one at a time, said so
        with pytest.raises(BatchError, match="carry a state along the sequence"):
            BatchTrial(lm, items, max_new_tokens=2)
        record_matrix(f"{family} video", "batched == one at a time", True, "refused: linear layers carry a state "
                      "through the padding (one example at a time)", refused=True)
        return
    bs = _check_equal(random_lm(family), items, [[Truncate(1)], [Truncate(0)]], n_new=3)
    assert len({r.n_prompt for r in bs.rows}) == 2 and bs.rows[0].image_positions.size != bs.rows[1].image_positions.size
    record_matrix(f"{family} video", "batched == one at a time", True)


def test_a_video_keeps_its_frames_and_fingerprint(clip):
    assert isinstance(clip, Video) and len(clip.frames) == 6
    other = load_video(list(reversed(clip.frames)), frames=6)
    assert other.sha256() != clip.sha256()
    run = capture(random_lm("qwen2_vl"), clip, PROMPT, max_new_tokens=0)
    assert run.meta["image_sha256"] == clip.sha256()


@pytest.mark.parametrize("family", ALL_VIDEO)
def test_the_dashboard_opens_a_video_capture(family, tmp_path):
    """The video box's path: a file uploaded, frames sampled, the run drawn per temporal slot (heatmaps
    over the contact sheet, attention per slot, LLaVA-CAM through the video), experiments re-run on
    the video; a run opened from its files says why it cannot re-run, and bad uploads are named."""
    import plotly.graph_objects as go

    from vlmlens.ui import experiment_views, run_views
    from vlmlens.ui.callbacks import Dashboard, new_session

    lm = random_lm(family)
    path = _write_video(tmp_path / "ramp.mp4", n=12, size=(64, 48))
    dash = Dashboard(model=f"random:{family}", runs_dir=tmp_path / "runs", loader=lambda *a, **k: lm)
    dash.holder.wait(30)
    sess, info, gen, _strip, headline = dash.capture_video(path, 6.0, PROMPT, 2, new_session())
    entry = dash.entry(sess)
    run = entry.run
    assert run.meta["video"]["indices"] == sample_indices(12, 6) and run.meta["video"]["slots"] == 3
    assert info["n_image_tokens"] == run.spans.n_image and gen and headline
    assert "llava_cam" in run.arrays and "analysis_failed" not in run.meta
    frames = run_views.frames_figure(entry)
    assert [t.type for t in frames.data] == ["heatmap"] and len(frames.data[0].z[0]) == 3
    idx = sample_indices(12, 6)                          # slot 1 holds the third and fourth sampled frames
    assert list(frames.layout.xaxis.ticktext)[1].startswith(f"frames {idx[2]}–{idx[3]}<br>{idx[2] / 10:.1f}")
    first = min(run.meta.get("attention_layers", [0]))           # (a hybrid's first layer is a linear one)
    heat = run_views.heatmap_layer(entry, first, 0, "attention", lm)
    z = [t for t in heat.data if t.type == "heatmap"][0].z
    assert (len(z), len(z[0])) == tuple(run.image_grid)
    figs = [f for f in dash._all_figures(entry) if isinstance(f, go.Figure)]
    assert all(len(f.data) or f.layout.annotations for f in figs)
    mode = "remove" if "attention_layers" in run.meta else "drop"   # (no key mask on a hybrid's linear layers)
    result = experiment_views.run_truncation(lm, entry, [0, 1], mode, sweep=False)
    assert [d["depth"] for d in result["depths"]] == [0, 1]
    assert list(result["baseline_tokens"]) == list(run.generated_tokens)     # the video re-run, not its sheet
    # the same run opened from its files: the contact sheet is not the video
    from vlmlens.ui.store import Entry

    reopened = Entry("x", run, "saved", "saved:x")
    with pytest.raises(InputError, match="capture it again from the video"):
        experiment_views.run_truncation(lm, reopened, [0], mode, sweep=False)
    assert "is an image" in " ".join(a.text or "" for a in run_views.frames_figure(
        dash.entry(dash.capture(_still(tmp_path), PROMPT, 1, new_session())[0])).layout.annotations)
    import gradio as gr

    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(gr.Error, match="cannot read video junk.mp4"):
        dash.capture_video(str(tmp_path / "junk.mp4"), 4, PROMPT, 2, new_session())
    with pytest.raises(gr.Error, match="no video"):
        dash.capture_video(None, 4, PROMPT, 2, new_session())
    small = Dashboard(model=f"random:{family}", runs_dir=tmp_path / "runs", loader=lambda *a, **k: lm,
                      max_image_tokens=10)
    small.holder.wait(30)
    with pytest.raises(gr.Error, match="at most 10 are accepted"):
        small.capture_video(path, 6, PROMPT, 2, new_session())


def _still(tmp_path):
    p = tmp_path / "still.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(p)
    return str(p)


def test_the_command_line_captures_a_video(tmp_path, capsys):
    from vlmlens.cli import main

    clip = _write_video(tmp_path / "clip.mp4", n=8)
    rc = main(["capture", "--model", "random:qwen2_vl", "--video", str(clip), "--frames", "4", "--prompt", PROMPT,
               "--max-new-tokens", "1", "--out", str(tmp_path / "run")])
    assert rc == 0
    run = vl.load_run(tmp_path / "run")
    assert run.meta["video"]["indices"] == sample_indices(8, 4) and run.meta["grid_order"] == "frames"
    with pytest.raises(SystemExit) as e:              # one visual input: an image or a video
        main(["capture", "--model", "random:qwen2_vl", "--video", str(clip), "--image", "x.png", "--prompt", PROMPT])
    assert e.value.code == 2
    assert main(["capture", "--model", "random:qwen2_vl", "--video", str(tmp_path / "none.mp4"),
                 "--prompt", PROMPT]) == 2
    assert "does not exist" in capsys.readouterr().err
