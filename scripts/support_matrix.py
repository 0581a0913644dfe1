"""Write docs/support.md -- family x feature, exact or not -- from the tests' own results.

    python scripts/support_matrix.py            # runs the family tests (about a minute), writes docs/support.md

Runs the per-family tests (capture == plain forward and eager attention, batched == one at a time,
and tests/test_family_matrix.py's interventions against eager references) with pytest's JUnit
report, and turns each test's outcome into a cell: nothing here is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {
    "capture == forward + eager attention": "tests/test_capture.py::test_capture_matches_plain_model",
    "batched == one at a time": "tests/test_batch.py::test_a_batch_equals_one_item_at_a_time_on_every_family",
    "logit lens == model logits": "tests/test_arch.py::test_logit_lens_matches_model_logits",
    "dashboard opens a capture": "tests/test_family_dashboard.py::test_the_dashboard_opens_a_capture_of_every_family",
}
MATRIX = "tests/test_family_matrix.py"
#: the same columns for a video input (rows "<family> video"; the matrix's cells come from tests/test_video.py)
VIDEO_TESTS = {
    "capture == forward + eager attention": "tests/test_video.py::test_video_capture_matches_plain_model",
    "dashboard opens a capture": "tests/test_video.py::test_the_dashboard_opens_a_video_capture",
}
VIDEO = "tests/test_video.py"
#: what the table cannot say: the semantics of families that differ, and the families not opened yet
NOTES = """## Families with their own semantics

* **Qwen3-VL / Qwen3-VL-MoE (DeepStack).** The model adds features of a few vision-tower layers to the
  image rows of the outputs of its first decoder layers (3 on the released checkpoints, 2 on the tiny
  ones). The lens adds them itself (`vlmlens/lens_injections.py`): `hidden_states[l]` is what layer `l`
  reads, the addition included (transformers' `hidden_states` hold the outputs before it); `Truncate(k)`
  and `Freeze(k)` stop the additions from layer `k` on; rows taken out of the sequence (`remove`) receive
  nothing, the remaining image rows their own features; `Substitute` carries the states of its source
  layer, additions included, and later additions go on as in the model. Runs list `injection_layers`
  and `injections_stopped`; the movement and dynamics figures shade the layers that received them.
  Tested in `tests/test_deepstack.py` and the matrix above.
* **Qwen3.5 and Qwen3.5-MoE (hybrid stacks).** Three of every four decoder layers are gated-delta-net linear attention:
  they read the image without attention weights. There the run holds NaN for every attention
  statistic and the dashboard says "not defined"; a key mask that would act on such a layer (Truncate
  `drop`, Knockout, FastV `mask`, a FastV ranking read there) is refused with the reason; removing rows
  (Truncate / FastV `remove`) is exact; knockout stages and their cosine proxy say "not defined";
  batches run one example at a time (the padding that aligns examples would change the layers' state).
* **Video (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and their MoE; rows "video").** Frames are read with PyAV and sampled evenly
  (`vlmlens.video`); `models/video_frames.py` processes them without torchvision (each frame by the
  checkpoint's image processor at its video pixel bounds, pairs stacked into temporal patches: a video of
  one repeated frame is exactly the image, tested). The video tokens are the run's modality span, so every
  statistic and intervention reads them as it reads image tokens; a *temporal slot* (2 sampled frames,
  one raster of tokens) is the unit of time: the run keeps a contact sheet (one frame per slot) as its
  image, heatmaps are drawn per slot over it, `analysis.attention.frame_attention` gives each slot's
  share per layer, and `Truncate(k, frames=[...])` cuts chosen slots (drop and remove, each against an
  eager reference). Qwen2.5-VL spaces the slots' temporal positions by the sampled frame rate, which
  the processor passes on (`second_per_grid_ts`); Qwen3-VL writes each slot's time into the prompt before
  it (the slots are then separate runs of tokens). On a DeepStack model a cut of chosen slots is refused
  (its added features are cut for the whole video or not at all). Tested in `tests/test_video.py`.
* **Mllama (cross-attention).** The image never enters the self-attention stream: the sequence holds one
  `<|image|>` placeholder, and gated cross-attention layers (1 and 3 on the tiny model; every fifth on
  Llama 3.2 Vision) read the vision tower's patches as keys. The lens runs those layers with the model's own
  attention and mask and records their maps (`cross_attention_maps`, == eager weights), drawn over the image's
  tiles as the processor cut them (`figures.attention.fig_cross_attention`, the attention tab). `Truncate(k)`
  (mode drop) skips the cross-attention layers >= k -- `Truncate(0)` equals the model's own path without an
  image -- and `Knockout(src, "image", layers)` skips a cross-attention layer for the src rows, each against a
  hand-written eager reference. What acts on image rows of the stream has no meaning here and is refused
  with the reason: mode `remove`, `Freeze`, `Substitute`, FastV and the other pruners, a knockout at layers
  without cross-attention, LLaVA-CAM, batches; every view of the sequence's image tokens (attention share,
  heatmaps, geometry, movement, the stage proxies) says "not defined" instead of drawing the placeholder.
  Tested in `tests/test_cross_attention.py`, `tests/test_capture.py` and the matrix above.
* **Mistral 3 (Pixtral's layout).** transformers' `PixtralProcessor` cannot be imported without torchvision;
  `vlmlens/models/pixtral_processor.py` is the same processor on the PIL image processor (a checkpoint's files
  load into it). The picture keeps its aspect ratio: (h/28) x (w/28) image tokens, every row ended by an
  `[IMG_BREAK]` and the last by `[IMG_END]`. Those two are text tokens of the vocabulary, so they count as
  text rows (queries) and are never cut, frozen or pruned with the image; the heatmaps place the `[IMG]`
  tokens only. A batch pads each picture with zeros below and to the right (the tower reads each one only as
  far as its `image_sizes`). A `llava` checkpoint with a Pixtral tower (Pixtral-12B) is read the same way: its
  processor files name `PixtralProcessor`, and the grid follows `image_sizes` (tested in `tests/test_pixtral.py`:
  capture == plain generate, a batch of different sizes == one at a time). LightOnOCR (`lighton_ocr`) resizes as
  Pixtral does but writes a plain raster of image tokens, no break tokens; its own processor needs no torchvision.
* **PaliGemma (prefix-LM)** and **Gemma 3 (bidirectional image block).** Every intervention starts from
  the model's own mask: the prefix (PaliGemma) or the image (Gemma 3) reads both ways, also where rows
  were removed.

## Not opened yet (each says why)

* `llama4`, `lfm2_vl`, `cohere2_vision`, `perception_lm`: transformers ships only torchvision image
  processors for them.
* `gemma4`: its decoder layers also read per-layer token embeddings and, on the small checkpoints, keys and
  values shared from earlier layers; the lens's row removal (`remove` cuts, FastV) does not yet carry either,
  so it is not opened until both are handled and tested against an eager reference.
* `idefics2`: its perceiver resampler turns the image into 64 latents with no position on the image, so
  no heatmap of them would mean anything; not opened until the dashboard can say so in every view.
* `lfm2_vl`, `lfm3_vl`: hybrid stacks like Qwen3.5's (the lens handles them the same
  way); not yet built as tiny models and tested (LFM2-VL's processor also needs torchvision).
* Video inputs of `llava_next_video`, `llava_onevision`, `video_llava`, `glm4v`: images only for now (their video processors need torchvision; each needs its own
  torchvision-free frame processor, as `qwen2_vl` has).
""".splitlines()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "support.md"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from vlmlens.models.families import ARCHES
    from vlmlens.models.tiny_random import FAMILIES

    with tempfile.TemporaryDirectory() as tmp:
        junit, detail = Path(tmp) / "junit.xml", Path(tmp) / "matrix.json"
        env = dict(os.environ, VLMLENS_MATRIX_OUT=str(detail))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *TESTS.values(), MATRIX, VIDEO]
        subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        outcome: dict = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            m = re.search(r"\[(?:[^\]-]*-)?([a-z0-9_]+)\]$", case.get("name", ""))
            if not m:
                continue
            ok = not any(ch.tag in ("failure", "error", "skipped") for ch in case)
            outcome[(case.get("classname", "").replace(".", "/") + ".py::" + case.get("name").split("[")[0],
                     m.group(1))] = ok
        matrix = json.loads(detail.read_text()) if detail.is_file() else {}
    features = list(TESTS) + sorted({w for fam in matrix.values() for w in fam} - set(TESTS))
    lines = ["# Support matrix: every family, every feature, tested exact", "",
             "Generated by `python scripts/support_matrix.py` from the tests' results (tiny random configs of each",
             "family's real transformers classes; exact = within 1e-4 of the reference: plain forwards, eager",
             "attention, or an eager forward with the intervention written by hand on the model's own mask;",
             "refused = the lens refuses it with the reason shown, and a test checks that it does; – = not",
             "applicable: `frames` cuts temporal slots of a video input, and the logit lens does not depend on the",
             "input's kind).", "",
             "| family | model class | " + " | ".join(features) + " |", "|---" * (len(features) + 2) + "|"]
    video_rows = [f"{a.family} video" for a in ARCHES.values() if a.video]
    for row in [*FAMILIES, *video_rows]:
        fam, video = row.split()[0], row.endswith(" video")
        tests = VIDEO_TESTS if video else TESTS
        cells = []
        for feat in features:
            r = matrix.get(row, {}).get(feat)
            if r is not None and r.get("refused") and r["ok"]:
                cells.append(r["detail"])                    # refused by the lens, with its reason (tested)
            elif feat in tests:
                ok = outcome.get((tests[feat], fam))
                word = "opens" if feat.startswith("dashboard") else "exact"
                cells.append("–" if ok is None else (word if ok else "**fails**"))
            else:
                cells.append("–" if r is None else ("exact" if r["ok"] else f"**fails** ({r['detail']})"))
        label = f"`{fam}` video" if video else f"`{fam}`"
        lines.append(f"| {label} | {ARCHES[fam].model_class} | " + " | ".join(cells) + " |")
    lines += ["", *NOTES]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
