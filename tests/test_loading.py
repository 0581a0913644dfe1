"""Local directories go through from_pretrained: the same path as hub checkpoints."""
import numpy as np
import pytest

import vlmlens as vl
from vlmlens.models.tiny_random import build_random

from tests._models import random_lm


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_saved_model_loads_and_captures_identically(tmp_path, family, image):
    model, proc = build_random(family)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    lm = vl.load_model(str(tmp_path), device="cpu", dtype="float32")
    assert lm.family == family and type(lm.model) is type(model)
    ref = random_lm(family)
    lm.model.generation_config.suppress_tokens = ref.model.generation_config.suppress_tokens
    a = vl.capture(lm, image, "What is in the image?", max_new_tokens=3, hidden_dtype="float32")
    b = vl.capture(ref, image, "What is in the image?", max_new_tokens=3, hidden_dtype="float32")
    assert a.token_ids == b.token_ids
    assert np.abs(a.hidden_states - b.hidden_states).max() <= 1e-5


def test_dtype_and_device_errors():
    with pytest.raises(vl.InputError, match="unknown dtype"):
        vl.load_model("random:llava", dtype="float8")
    with pytest.raises(vl.InputError, match="unknown device"):
        vl.load_model("random:llava", device="tpu")


def test_bfloat16_capture_runs(image):
    lm = vl.load_model("random:llava", device="cpu", dtype="bfloat16")
    run = vl.capture(lm, image, "What is in the image?", max_new_tokens=2)
    assert run.meta["model_dtype"] == "bfloat16"
    assert np.isfinite(run.hidden_states).all() and np.nanmax(run.attention_to_image) <= 1.0 + 1e-3


def test_unknown_hub_id_offline_fails_fast_and_clearly(monkeypatch):
    import socket

    import vlmlens as vl
    from vlmlens.models.loading import UnsupportedModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dialled = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: dialled.append(a[:2]) or real(*a, **k))
    with pytest.raises(UnsupportedModel, match="offline .* not in the local cache"):
        vl.load_model("someone/not-a-model", device="cpu")
    assert dialled == []                     # fast because no host is even looked up (no retries, no timeouts)


def test_load_makes_the_processors_first_call_and_a_refusing_processor_still_loads(monkeypatch):
    """load_model warms the processor (chat template, tokenizer, image processor) with one small grey image so
    that a script's first capture does not pay for it; a processor that refuses the warm-up still loads, and the
    user's own input then gets the real error."""
    from vlmlens.models.arch import Arch

    seen = []
    real = Arch.build_inputs

    def counting(self, processor, image, prompt):
        seen.append((image.size, prompt))
        return real(self, processor, image, prompt)

    monkeypatch.setattr(Arch, "build_inputs", counting)
    lm = vl.load_model("random:llava", device="cpu")
    assert seen == [((64, 64), "?")]

    def refusing(self, processor, image, prompt):
        raise ValueError("this processor wants a bigger image")

    monkeypatch.setattr(Arch, "build_inputs", refusing)
    lm = vl.load_model("random:llava", device="cpu")
    assert lm.family == "llava"
    with pytest.raises(ValueError, match="bigger image"):
        vl.capture(lm, np.zeros((32, 32, 3), np.uint8), "What is this?", max_new_tokens=1)
