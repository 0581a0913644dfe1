"""Per-family architecture facts, checked against the tiny random models of every family."""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlmlens.models.arch import GridInfo, UnsupportedArchitecture
from vlmlens.models.families import ARCHES, arch_for, get_arch
from vlmlens.models.grids import GridSegment
from vlmlens.models.tiny_random import FAMILIES, build_random
from vlmlens.lens import NOTHING, Lens, Plan

torch.set_num_threads(2)

PROMPT = "What is in the image?"
SIZES = [(56, 72), (224, 224), (90, 300), (300, 90)]  # (height, width)


@functools.lru_cache(maxsize=None)
def tiny(family):
    return build_random(family)


def scene(h, w):
    """A picture with structure (so thumbnails and tiles can be matched)."""
    im = Image.new("RGB", (w, h), (30, 60, 200))
    d = ImageDraw.Draw(im)
    d.ellipse([w * 0.1, h * 0.1, w * 0.5, h * 0.6], fill=(250, 40, 40))
    d.rectangle([w * 0.6, h * 0.5, w * 0.95, h * 0.95], fill=(40, 250, 40))
    for x in range(0, w, max(w // 7, 1)):
        d.line([x, 0, w - x, h], fill=(255, 255, 0), width=2)
    return im


@functools.lru_cache(maxsize=None)
def prepared(family, hw=(56, 72)):
    model, proc = tiny(family)
    arch = arch_for(model)
    img = scene(*hw)
    inputs = arch.build_inputs(proc, img, PROMPT)
    n = int((inputs["input_ids"] == arch.image_token_id(model, proc)).sum())
    return model, proc, arch, img, inputs, n


def test_registry_matches_families():
    assert set(ARCHES) == set(FAMILIES)
    for f in FAMILIES:
        assert tiny(f)[0].config.model_type == f
        assert get_arch(f).family == f


def test_unknown_model_type_is_key_error_naming_supported():
    with pytest.raises(KeyError) as e:
        get_arch("llama4")
    assert isinstance(e.value, UnsupportedArchitecture)
    msg = str(e.value)
    assert "llama4" in msg and not msg.startswith("'")
    for f in FAMILIES:
        assert f in msg


@pytest.mark.parametrize("family", FAMILIES)
def test_modules_and_text_config(family):
    model, proc = tiny(family)
    arch = get_arch(family)
    assert arch.model_class == type(model).__name__
    # transformers' PixtralProcessor cannot be imported without torchvision: ours stands in for it
    offline = {"PixtralProcessor": "PixtralProcessorPil"}.get(arch.processor_class, arch.processor_class)
    assert offline in [c.__name__ for c in type(proc).__mro__]
    layers = arch.decoder_layers(model)
    cfg = arch.text_config(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == cfg.num_hidden_layers
    # the object whose _attn_implementation the decoder's attention actually reads (the attention
    # layers: a hybrid stack's linear-attention layers have none, and the lens finds the same ones)
    att = arch.attention_layers(model)
    assert 1 <= len(att) and Lens(layers, Plan.build([], len(layers), 1, NOTHING)).attention_layers == set(att)
    for i in att:
        assert layers[i].self_attn.config is cfg
    assert cfg.hidden_size == model.get_input_embeddings().embedding_dim
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert arch.lm_head(model).weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert isinstance(arch.final_norm(model), torch.nn.Module)
    vm = arch.vision_modules(model)
    assert set(vm) == {"vision_tower", "projector"}
    assert all(isinstance(m, torch.nn.Module) for m in vm.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs_has_family_kwargs(family):
    model, proc, arch, img, inputs, n = prepared(family)
    for key in ("input_ids", "attention_mask", *arch.required_inputs):
        assert isinstance(inputs[key], torch.Tensor), key
    assert inputs["input_ids"].shape[0] == 1
    assert arch.image_token_id(model, proc) == model.config.image_token_id
    # grayscale input is converted, and gives the same token layout as RGB
    gray = arch.build_inputs(proc, img.convert("L"), PROMPT)
    assert torch.equal(gray["input_ids"], inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_matches_model_logits(family):
    model, proc, arch, img, inputs, n = prepared(family)
    seen = {}

    def grab(mod, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = arch.decoder_layers(model)[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            lens = arch.unembed(model, seen["h"])
    finally:
        handle.remove()
    assert lens.shape == logits.shape
    assert (lens - logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hw", SIZES)
def test_image_token_count_matches_grid(family, hw):
    model, proc, arch, img, inputs, n = prepared(family, hw)
    info = arch.grid_info(inputs, n, processor=proc, image=img)
    assert info.exact
    assert info.n_tokens == n == sum(s.n_tokens for s in info.segments)
    rows, cols = arch.image_grid(inputs, n, processor=proc, image=img)
    assert (rows, cols) == (info.rows, info.cols)
    idx = info.index_map()
    assert idx.shape == (rows, cols) and idx.min() >= 0 and len(np.unique(idx)) == idx.size and idx.max() < n
    if info.order == "raster":
        assert rows * cols == n and np.array_equal(idx.ravel(), np.arange(n))
    elif info.order == "tiles":
        overview = info.segments[-1]
        assert overview.name in ("thumbnail", "global") and overview.start + overview.n_tokens == n
        assert rows * cols == n - overview.n_tokens
    else:  # base+anyres
        base, anyres = info.segments
        assert (rows, cols) == (base.rows, base.cols) and base.n_tokens == rows * cols
        assert anyres.start == rows * cols and anyres.row_stride == anyres.cols + 1
    # the same layout comes out of the inputs alone (capture may not pass processor/image)
    bare = arch.grid_info(inputs, n)
    assert bare.exact and bare["tile_grid"] == info["tile_grid"] and (bare.rows, bare.cols) == (rows, cols)
    # JSON round trip keeps the layout usable
    again = GridInfo(json.loads(json.dumps(info)))
    assert np.array_equal(again.index_map(), idx)
    assert np.array_equal(again.to_grid(torch.arange(n)), idx)


def test_grid_wrong_count_raises():
    model, proc, arch, img, inputs, n = prepared("llava")
    with pytest.raises(ValueError):
        arch.grid_info(inputs, n - 1)


def test_llava_grid_is_patch_raster():
    model, proc, arch, img, inputs, n = prepared("llava")
    v = model.config.vision_config
    k = v.image_size // v.patch_size
    assert n == k * k == 36 and arch.image_grid(inputs, n) == (6, 6)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_grid_from_thw(family):
    # smart_resize to multiples of 16 px (patch 8 x merge 2) within 32^2..96^2 pixels:
    # 224x224 -> 96x96; 90x300 -> 48x160 (area cap); 56x72 -> 64x64 (rounding 3.5 and 4.5 to 4)
    for hw, expect in [((224, 224), (6, 6)), ((90, 300), (3, 10)), ((56, 72), (4, 4))]:
        model, proc, arch, img, inputs, n = prepared(family, hw)
        t, h, w = inputs["image_grid_thw"][0].tolist()
        assert t == 1 and (h // 2, w // 2) == expect and n == h * w // 4
        assert arch.image_grid(inputs, n) == expect
        assert int(inputs["mm_token_type_ids"].sum()) == n


def test_llava_next_base_plus_anyres():
    model, proc, arch, img, inputs, n = prepared("llava_next", (224, 224))
    # square picture -> 64x64 pinpoint = 2x2 tiles of 4x4 patches -> 8x8 grid + 8 newlines, after a 4x4 base
    assert n == 16 + 8 * 9
    info = arch.grid_info(inputs, n)
    base, anyres = info.segments
    assert (base.rows, base.cols, anyres.rows, anyres.cols) == (4, 4, 8, 8)
    assert info.order == "base+anyres" and arch.image_grid(inputs, n) == (4, 4)
    # wide picture: the letterbox rows are cut away (unpadded), so fewer anyres rows than columns
    model, proc, arch, img, inputs, n = prepared("llava_next", (90, 300))
    anyres = arch.grid_info(inputs, n).segments[1]
    assert anyres.rows < anyres.cols and n == 16 + anyres.rows * (anyres.cols + 1)


@pytest.mark.parametrize("family,overview", [("internvl", "thumbnail"), ("idefics3", "global")])
def test_tiled_families(family, overview):
    model, proc, arch, img, inputs, n = prepared(family, (224, 224))
    info = arch.grid_info(inputs, n, processor=proc, image=img)
    assert info.order == "tiles" and info["tile_grid"] == [2, 2] and (info.rows, info.cols) == (8, 8)
    assert n == 5 * 16
    tiles = info.segments
    assert [s.name for s in tiles] == ["tile"] * 4 + [overview]
    assert tiles[1].box == (0.0, 0.5, 0.5, 1.0)  # second tile is top-right
    idx = info.index_map()
    assert idx[0, 4] == 16 and idx[4, 0] == 32 and idx[7, 7] == 63
    wide = prepared(family, (90, 300))
    wide_info = wide[2].grid_info(wide[4], wide[5], processor=wide[1], image=wide[3])
    tall = prepared(family, (300, 90))
    tall_info = tall[2].grid_info(tall[4], tall[5], processor=tall[1], image=tall[3])
    assert wide_info["tile_grid"][::-1] == tall_info["tile_grid"] and wide_info["tile_grid"][0] == 1


def test_internvl_without_layout_hints_is_flagged():
    model, proc, arch, img, inputs, n = prepared("internvl", (224, 224))
    flat = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))  # nothing to match on
    info = arch.grid_info(flat, n)
    assert not info.exact and info["tile_grid"] == [2, 2]


def test_single_tile_is_raster():
    # InternVL: a tiny picture fits one tile, so there is no thumbnail and the tokens are one raster
    model, proc, arch, img, inputs, n = prepared("internvl", (20, 20))
    assert inputs["pixel_values"].shape[0] == 1 and n == 16
    assert arch.grid_info(inputs, n).order == "raster"


def test_segment_index_map_with_row_stride():
    seg = GridSegment("anyres", 16, 2, 3, row_stride=4)
    assert seg.n_tokens == 8
    assert seg.index_map().tolist() == [[16, 17, 18], [20, 21, 22]]


def test_llava_next_base_only_layout():
    # one view (no anyres tiles): base k*k followed by a single newline token
    inputs = {"pixel_values": torch.zeros(1, 1, 3, 32, 32), "image_sizes": torch.tensor([[32, 32]])}
    info = get_arch("llava_next").grid_info(inputs, 17)
    assert (info.rows, info.cols) == (4, 4) and [s.name for s in info.segments] == ["base", "newline"]


def test_gemma3_pan_and_scan_blocks():
    # two 16-token blocks (image + one crop) marked by token_type_ids, separated by text
    tt = torch.tensor([[0] * 3 + [1] * 16 + [0] * 4 + [1] * 16 + [0] * 2])
    info = get_arch("gemma3").grid_info({"token_type_ids": tt}, 32)
    assert (info.rows, info.cols) == (4, 4) and info.order == "tiles" and not info.exact
    assert [s.start for s in info.segments] == [0, 16]


def test_llava_onevision_anyres_max_layout_equals_the_models_own_packing():
    """LLaVA-OneVision shrinks a large anyres grid to about 9 tiles (anyres_max_9); the token
    count and grid the lens draws equal what the model's own pack_image_features produces."""
    import transformers

    from vlmlens.models import grids

    model, _proc = build_random("llava_onevision")
    pins = [[128, 128], [32, 64]]
    model.config.image_grid_pinpoints = pins
    k, d = 4, model.config.text_config.hidden_size
    feats = [torch.randn(17, k * k, d)]                            # base + 16 tiles of 4x4 tokens
    packed, lens = model.model.pack_image_features(feats, torch.tensor([[128, 128]]), model.model.image_newline)
    n = int(lens[0])
    inputs = {"pixel_values": torch.zeros(1, 17, 3, 32, 32), "image_sizes": torch.tensor([[128, 128]])}
    info = grids.llava_onevision_grid(inputs, n, None)
    anyres = next(t for t in info["tiles"] if t["name"] == "anyres")
    assert n == 16 + 12 * 13 and (anyres["rows"], anyres["cols"]) == (12, 12)     # 16x16 shrunk by sqrt(256/144)
    assert grids.llava_next_grid(inputs, 16 + 16 * 17, None)["tiles"][1]["rows"] == 16   # NeXT keeps it whole
    assert isinstance(model, transformers.LlavaOnevisionForConditionalGeneration)
