"""LoRA adapter folders, checked before anything is built from them.

An adapter is a folder in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
(pickled ``adapter_model.bin`` files are never read). peft allocates what the config asks for
before it reads a single weight, so a 200-byte config could ask for gigabytes (``r = 10^7``, a
prompt-tuning config with 10^8 virtual tokens). :func:`check_adapter` therefore reads only the
config and the safetensors *header* and refuses, with one clear message naming the file:

* a config that is not a JSON object, a peft type other than LoRA, options that add weights of
  their own (DoRA, ``modules_to_save``, rank/alpha patterns, layer replication, trainable
  tokens, LoRA biases, target parameters, per-layer selections);
* a rank that is not a whole number in 1..min(in, out) of every targeted projection;
* a weights file that is not safetensors (a pickle, a truncated file), holds no tensors, or
  whose tensors are not exactly the ``lora_A`` [r, in] / ``lora_B`` [out, r] pair of every
  module the config targets (missing, extra or misshapen ones).

Only then does :func:`load_adapter` let peft build and merge it.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from ..errors import InputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1_000_000
#: config keys that, when set, make peft allocate weights this check does not account for
_UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "trainable_token_indices", "lora_bias", "target_parameters", "layers_to_transform", "layers_pattern",
                "use_bdlora", "use_qalora")


def check_adapter_dir(path) -> Path:
    """The folder of an adapter with a sane LoRA config (without the model): InputError otherwise."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise InputError(f"{path} is not an adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE};"
                         " pickled adapter_model.bin files are not read)")
    read_config(p)
    return p


def read_config(p: Path) -> dict:
    f = p / CONFIG_FILE
    try:
        if f.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{f} is {f.stat().st_size:,} bytes; an adapter config is a small JSON object")
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
        raise InputError(f"{f} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{f} must hold a JSON object (peft's LoRA config), not {type(cfg).__name__}")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise InputError(f"{f}: peft_type {kind!r} is not supported; vlmlens loads LoRA adapters (peft_type \"LORA\")")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{f}: the rank r must be a whole number >= 1, got {r!r}")
    for key in _UNSUPPORTED:
        if cfg.get(key) not in (None, False, {}, []):
            raise InputError(f"{f}: {key} = {str(cfg[key])[:80]!r} is not supported (vlmlens loads plain LoRA adapters:"
                             " one A/B pair per targeted projection)")
    t = cfg.get("target_modules")
    if not (isinstance(t, str) and t) and not (isinstance(t, list) and t and all(isinstance(x, str) for x in t)):
        raise InputError(f"{f}: target_modules must be a module name pattern or a list of names, got {str(t)[:80]!r}")
    return cfg


def _matches(spec, name: str) -> bool:
    """peft's rule: a string is a full-name regex; a list matches a name or its last parts."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _header(p: Path) -> dict:
    """{tensor name: shape} from the safetensors header, no tensor read."""
    from safetensors import SafetensorError, safe_open

    f = p / WEIGHTS_FILE
    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{f} is not a readable safetensors file ({str(e)[:160]}); adapters are read from"
                         " safetensors only") from None


def check_adapter(model, path) -> dict:
    """The adapter's config, after checking it against ``model`` and the weights file's header
    (see the module docstring); InputError naming what does not fit, before any allocation."""
    import torch

    p = check_adapter_dir(path)
    cfg = read_config(p)
    r, f = cfg["r"], p / CONFIG_FILE
    targets = {}
    for name, mod in model.named_modules():
        if not name or not _matches(cfg["target_modules"], name) or _matches(cfg.get("exclude_modules"), name):
            continue
        if not isinstance(mod, torch.nn.Linear):
            raise InputError(f"{f}: target {name} is a {type(mod).__name__}; vlmlens loads LoRA on linear layers only")
        targets[name] = (mod.in_features, mod.out_features)
    if not targets:
        raise InputError(f"{f}: target_modules {str(cfg['target_modules'])[:80]!r} match no linear layer of this model")
    bound = min(min(io) for io in targets.values())
    if r > bound:
        raise InputError(f"{f}: rank r = {r:,} is larger than the smallest targeted projection ({bound}); a LoRA rank"
                         " is at most min(in, out) of the layers it adapts")
    got = _header(p)
    if not got:
        raise InputError(f"{p / WEIGHTS_FILE} holds no tensors: an adapter without weights changes nothing")
    want = {}
    for name, (n_in, n_out) in targets.items():
        want[f"base_model.model.{name}.lora_A.weight"] = [r, n_in]
        want[f"base_model.model.{name}.lora_B.weight"] = [n_out, r]
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected tensors missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} tensors for no targeted module (e.g. {extra[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: {got[k]}, expected {want[k]} for r = {r})")
        raise InputError(f"{p / WEIGHTS_FILE} does not match its config and this model: " + "; ".join(parts))
    return cfg


def quietly(make):
    """``make()`` (a peft call that wraps a model) without the FutureWarning it causes: peft reads
    ``is_gradient_checkpointing``, which transformers 5 deprecated; the warning is about peft's code, not the
    user's, and would be printed on every adapter load and training start."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return make()


def load_adapter(model, path):
    """``model`` with the adapters in ``path`` merged into its weights (checked first: :func:`check_adapter`)."""
    from peft import PeftModel

    check_adapter(model, path)
    try:
        return quietly(lambda: PeftModel.from_pretrained(model, str(Path(path)), is_trainable=False)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise InputError(f"the adapters in {path} do not fit this model: {str(e).splitlines()[0][:300]}") from None
