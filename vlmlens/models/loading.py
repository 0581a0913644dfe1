"""load_model: one entry point for built-in, random, local and hub models."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .arch import Arch
from .families import ARCHES, get_arch

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SHAPES_DIR = REPO_ROOT / "assets" / "tiny-shapes-vlm"
EXAMPLES = REPO_ROOT / "assets" / "examples"       # the example scenes (and their prompts) shipped with vlmlens
SMOL_SHAPES_DIR = REPO_ROOT / "assets" / "smol-shapes" / "model"     # git-ignored: python -m vlmlens build-model
BUILTIN = {"tiny-shapes": TINY_SHAPES_DIR, "smol-shapes": SMOL_SHAPES_DIR}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedModel(InputError):
    """The model's family has no Arch entry, or the name cannot be resolved."""


@dataclass
class LoadedModel:
    """A model ready for capture: the HF model, its processor and its family facts."""

    model: Any
    processor: Any
    arch: Arch
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def family(self) -> str:
        return self.arch.family

    @property
    def text_config(self):
        return self.arch.text_config(self.model)

    @property
    def n_layers(self) -> int:
        return len(self.arch.decoder_layers(self.model))

    def __post_init__(self):
        from .video_frames import attach_video_processor
        attach_video_processor(self.processor, self.arch)

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, family={self.family}, layers={self.n_layers}, device={self.device}, dtype={self.dtype})"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def supported_families() -> list[str]:
    return sorted(ARCHES)


def _model_class_for(config):
    """The transformers class that loads a whole VLM (vision tower + language model)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def load_model(
    name: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
    adapter: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a VLM and its processor.

    Args:
        name: ``"tiny-shapes"`` (the shipped default), ``"random:<family>"`` (a tiny
            random-weight model built offline), a local directory, or a hub id such as
            ``"llava-hf/llava-1.5-7b-hf"`` (goes to ``from_pretrained``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
            With several GPUs and ``"auto"``, weights are spread with ``device_map="auto"``.
        dtype: ``"auto"`` (bf16/fp16 on GPU, fp32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        trust_remote_code: passed to transformers; off unless the user asks for it.
        adapter: a folder of LoRA adapters in peft's format (``adapter_config.json`` +
            ``adapter_model.safetensors``, e.g. from ``python -m vlmlens recover``), merged
            into the weights after loading; the name becomes ``"<name>+<folder>"``.

    Raises:
        UnsupportedModel: the family is not supported (the message lists the supported ones)
            or the name is neither built in, a directory, nor a loadable hub id.
    """
    if adapter is not None:
        from .adapters import check_adapter_dir, load_adapter

        check_adapter_dir(adapter)         # its config, before spending time on the model
        lm = load_model(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        model = load_adapter(lm.model, adapter).eval()      # checked against the model before peft allocates
        return LoadedModel(model, lm.processor, lm.arch, f"{lm.name}+{Path(adapter).name}", lm.device, lm.dtype)
    if not isinstance(name, str) or not name.strip():
        raise UnsupportedModel("model name is empty; try 'tiny-shapes', 'random:llava' or a hub id")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name.startswith("random:"):
        from .tiny_random import FAMILIES, build_random

        family = name.split(":", 1)[1]
        if family not in FAMILIES:
            raise UnsupportedModel(f"unknown random family {family!r}; available: {', '.join('random:' + f for f in FAMILIES)}")
        model, processor = build_random(family)
        model = model.to(device=dev, dtype=dt).eval()
        return _primed(LoadedModel(model, processor, get_arch(model.config.model_type), name, dev, dt))

    path = BUILTIN.get(name, name)
    if name in BUILTIN and not Path(path).is_dir():
        how = ("build it: python -m vlmlens build-model smol-shapes (after bash scripts/install.sh --smol)"
               if name == "smol-shapes" else "reinstall or retrain it (python -m vlmlens.tiny train)")
        raise UnsupportedModel(f"built-in model {name!r} is missing at {path}; {how}")
    return _from_pretrained(str(path), name, dev, dt, trust_remote_code)


def hub_offline() -> bool:
    """Whether the user told the HF libraries to stay offline (then nothing is fetched)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _from_pretrained(path: str, name: str, dev: torch.device, dt: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    from . import efficientnet  # noqa: F401  (registers vlmlens's own vision tower with the Auto classes)

    local = os.path.isdir(path)
    offline = hub_offline()
    if local:
        _check_local_folder(Path(path), name, trust_remote_code)
    try:   # a local directory or the local cache first: no network, no retries
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as e:
        if local:
            raise UnsupportedModel(f"cannot load model folder {path!r}: {str(e).splitlines()[0][:300]}") from None
        if offline:
            raise UnsupportedModel(
                f"cannot load model {name!r}: not a built-in name ('tiny-shapes', 'random:<family>'), not a model "
                "directory, and not a cached hub id (offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set) and not in the"
                " local cache)") from None
        _probe_hub(name)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e2:
            raise UnsupportedModel(
                f"cannot load model {name!r}: not a built-in name ('tiny-shapes', 'random:<family>'), not a model "
                f"directory, and not reachable as a hub id ({str(e2).splitlines()[0]})"
            ) from None
    family = getattr(config, "model_type", None)
    if family not in ARCHES:
        raise UnsupportedModel(f"model family {family!r} of {name!r} is not supported; supported: {', '.join(supported_families())}")
    kwargs: dict = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if dev.type == "cuda" and torch.cuda.device_count() > 1 and dev.index is None:
        kwargs["device_map"] = "auto"
    try:
        model = _model_class_for(config).from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UnsupportedModel(f"cannot load the weights of {name!r}: {_first_line(e)}") from None
    except Exception as e:        # noqa: BLE001 - safetensors' own error for a damaged or truncated file
        if type(e).__name__ != "SafetensorError":
            raise
        raise UnsupportedModel(f"cannot load the weights of {name!r}: a safetensors file is damaged or truncated"
                               f" ({_first_line(e)})") from None
    if "device_map" not in kwargs:
        model = model.to(dev)
    arch = get_arch(family)
    return _primed(LoadedModel(model.eval(), _load_processor(path, arch, trust_remote_code), arch, name, dev, dt))


def _primed(lm: LoadedModel) -> LoadedModel:
    """The processor's first call made at load, where a user waits anyway: it compiles the chat template and
    warms the tokenizer and the image processor, which a script's first capture would otherwise pay for (a
    third of it on tiny-shapes; benchmarks/bench_first_capture.py). One small grey image and a one-character
    prompt; no forward. A processor that refuses them is left for the first real input to report."""
    from PIL import Image

    try:
        lm.arch.build_inputs(lm.processor, Image.new("RGB", (64, 64), (128, 128, 128)), "?")
    except Exception:  # noqa: BLE001 - only a warm-up: the user's own input gets the processor's real error
        pass
    return lm


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _check_local_folder(d: Path, name: str, trust_remote_code: bool) -> None:
    """What a model folder lacks, said before transformers tries (and says something else)."""
    cfg = d / "config.json"
    if not cfg.is_file():
        raise UnsupportedModel(f"model folder {str(d)!r} has no config.json")
    try:
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UnsupportedModel(f"{cfg} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise UnsupportedModel(f"{cfg} must hold a JSON object")
    if "auto_map" in doc and not trust_remote_code:
        raise UnsupportedModel(f"{cfg} names its own code (auto_map); vlmlens runs no remote code unless you pass"
                               " --trust-remote-code (only for code you trust)")
    if not doc.get("model_type"):
        raise UnsupportedModel(f"{cfg} has no model_type; supported: {', '.join(supported_families())}")
    has_st = any(d.glob("*.safetensors"))
    pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")] + [p.name for p in d.glob("*.pth")]
    if not has_st and pickled:
        raise UnsupportedModel(f"model folder {str(d)!r} holds pickled weights only ({', '.join(sorted(pickled)[:3])});"
                               " vlmlens never unpickles a file: convert them to safetensors (e.g. load and"
                               " save_pretrained(safe_serialization=True) where you trust the file)")


HUB_PROBE_SECONDS = 3.0


def _probe_hub(name: str) -> None:
    """One short connection attempt to the hub before transformers' retries (tens of seconds
    without a network): fail in seconds, saying how to use a local folder."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        raise UnsupportedModel(
            f"cannot load model {name!r}: not a built-in name ('tiny-shapes', 'random:<family>'), not a model folder,"
            f" not in the local cache, and the hub ({host}) cannot be reached; download the model elsewhere and give"
            " its folder (--model /path/to/folder), or set HF_HUB_OFFLINE=1 to use the cache only") from None


def _named_processor_class(path: str) -> str | None:
    """The processor class a checkpoint's own files name (``processor_class``), read from the folder or the local
    cache only; None when none says."""
    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            f = cached_file(path, name, local_files_only=True, _raise_exceptions_for_missing_entries=False)
            named = json.loads(Path(f).read_text()).get("processor_class") if f else None
        except (OSError, ValueError, AttributeError):
            named = None
        if isinstance(named, str):
            return named
    return None


def _load_processor(path: str, arch: Arch, trust_remote_code: bool):
    """AutoProcessor, or — where the family's processor insists on a video processor, which
    needs torchvision (AutoProcessor then fails or quietly returns a bare tokenizer) — the
    family's processor class without its video slot."""
    import transformers
    from transformers import AutoProcessor

    from .offline_text import without_video_processor
    from .video_frames import attach_video_processor

    error = None
    try:
        proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(proc, "image_processor"):
            return attach_video_processor(proc, arch, path)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as e:
        error = e
    try:
        # transformers' PixtralProcessor cannot be imported without torchvision (Mistral 3, and LLaVA checkpoints
        # with a Pixtral tower such as Pixtral-12B, which name it in their processor files)
        if "PixtralProcessor" in (arch.processor_class, _named_processor_class(path)):
            from .pixtral_processor import PixtralProcessorPil

            return PixtralProcessorPil.from_pretrained(path, trust_remote_code=trust_remote_code)
        cls = getattr(transformers, arch.processor_class, None)
        if cls is None:
            raise ValueError(f"transformers has no {arch.processor_class}")
        return attach_video_processor(without_video_processor(cls).from_pretrained(
            path, trust_remote_code=trust_remote_code), arch, path)
    except Exception as e:
        raise UnsupportedModel(
            f"cannot load the processor of {path!r} ({arch.processor_class}): {error or e}"
        ) from None
