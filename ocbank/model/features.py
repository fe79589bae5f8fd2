"""WideResNet-50 patch features: layer2 and upsampled layer3, concatenated (1536-d)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig, autocast_for
from ..data import file_sha256  # re-exported: model code imports it from here
from ..errors import WeightsError, warn_once

log = logging.getLogger(__name__)

FEATURE_DIM = 1536  # 512 (layer2) + 1024 (layer3)
FEATURE_STRIDE = 8  # layer2's stride: 224 -> 28, 512 -> 64
RANDOM_INIT_SEED = 0
# How weights "none" are drawn (stored in bank metadata): torchvision's init scheme from a
# local torch.Generator seeded with RANDOM_INIT_SEED, modules in ``net.modules()`` order.
RANDOM_INIT_SCHEME = "torchvision-init/local-generator/v1"


def imagenet_weights_file() -> tuple[Path, str]:
    """Where torchvision caches wide_resnet50_2's IMAGENET1K_V1 weights, and their URL."""
    from torchvision.models import Wide_ResNet50_2_Weights  # noqa: PLC0415

    url = Wide_ResNet50_2_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), url


def random_wide_resnet50_2(seed: int = RANDOM_INIT_SEED, upto: str | None = None) -> nn.Module:
    """wide_resnet50_2 with torchvision's initialisation drawn from a local generator.

    The global torch RNG is neither read nor advanced, so extractors built at the same
    time from several threads get identical weights. Built on the meta device (no
    draws), then every parameter and buffer is set here, in ``net.modules()`` order:
    convolutions kaiming-normal (fan_out, relu), batch norm weight 1 / bias 0 / running
    stats 0 and 1, the fc as ``nn.Linear``'s default (kaiming-uniform a=sqrt(5), bias
    U(+-1/sqrt(fan_in))). With ``upto="layer3"`` the later top-level parts (layer4, fc)
    are replaced by ``nn.Identity`` and never drawn: the tensors that remain are
    identical to the full net's, as the draws are sequential.
    """
    from torchvision.models import wide_resnet50_2  # noqa: PLC0415

    with torch.device("meta"):
        net = wide_resnet50_2(weights=None)
    if upto is not None:
        names = [name for name, _ in net.named_children()]
        for name in names[names.index(upto) + 1:]:
            setattr(net, name, nn.Identity())
    net = net.to_empty(device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    covered_ids: set[int] = set()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.num_batches_tracked.zero_()
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)
            else:
                continue
            covered_ids.update(id(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    left = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if id(t) not in covered_ids]
    if left:  # to_empty leaves garbage in anything not set above
        msg = f"random init left tensors uninitialised: {left[:5]}"
        raise RuntimeError(msg)
    return net


def _load_backbone(weights: str) -> nn.Module:
    """Build wide_resnet50_2 with ``weights`` = "imagenet", "none" or a .pth path."""
    from torchvision.models import wide_resnet50_2  # noqa: PLC0415

    if weights == "none":
        warn_once(
            log,
            f"backbone.weights is 'none': using a randomly initialised WideResNet-50 (seed {RANDOM_INIT_SEED}). "
            "Fine for tests and the demo; use ImageNet weights for real inspection.",
        )
        return random_wide_resnet50_2(RANDOM_INIT_SEED, upto="layer3")  # the extractor stops at layer3
    with torch.device("meta"):  # no random init (which would advance the global RNG): all loaded below
        model = wide_resnet50_2(weights=None)
    model = model.to_empty(device="cpu")
    if weights == "imagenet":
        path, url = imagenet_weights_file()
        if not path.is_file():
            msg = (
                f"ImageNet weights for wide_resnet50_2 were not found at {path}. "
                f"Download {url} on a machine with internet access and copy it to that path "
                "(or point TORCH_HOME at a folder holding hub/checkpoints/), or set "
                "backbone.weights to a .pth state dict. ocbank never falls back to random weights."
            )
            raise WeightsError(msg)
    else:
        path = Path(weights)
        if not path.is_file():
            msg = f"backbone.weights file {path} does not exist. Give a .pth state dict, 'imagenet' or 'none'."
            raise WeightsError(msg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # a corrupt or foreign file: say which and why
        msg = f"could not load wide_resnet50_2 weights from {path}: {exc}. Give a torchvision state dict."
        raise WeightsError(msg) from exc
    return model


def backbone_layers(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [B, 3, H, W] -> (layer2 [B, 512, H/8, W/8], layer3 [B, 1024, H/16, W/16]).

    ``net`` is anything with ``stem``, ``layer2`` and ``layer3``: a :class:`FeatureExtractor`,
    or the exported model that shares its layers.
    """
    f2 = net.layer2(net.stem(images))
    return f2, net.layer3(f2)


def patch_head(f2: torch.Tensor, f3: torch.Tensor, pool: str) -> torch.Tensor:
    """layer2 [B, C2, h, w], layer3 [B, C3, h', w'] -> patch features [B, h, w, C2 + C3].

    With ``pool="avg3"`` each layer is 3x3 average pooled first; layer3 is bilinearly
    upsampled to layer2's grid, then both are concatenated, channels last. Pure torch
    (it exports): the extractor and :class:`ocbank.model.module.AnomalyModel` share it.
    """
    if pool == "avg3":
        f2 = F.avg_pool2d(f2, 3, stride=1, padding=1)
        f3 = F.avg_pool2d(f3, 3, stride=1, padding=1)
    f3 = F.interpolate(f3, size=f2.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([f2, f3], dim=1).permute(0, 2, 3, 1)


class FeatureExtractor(nn.Module):
    """Images [B, 3, H, W] (ImageNet-normalised) -> patch features [B, H/8, W/8, 1536].

    layer2 (512 ch, stride 8) and layer3 (1024 ch, stride 16) of wide_resnet50_2;
    layer3 is bilinearly upsampled to layer2's grid before concatenation. With
    ``pool="avg3"`` each layer is 3x3 average pooled first (PatchCore's setting).
    """

    def __init__(self, weights: str = "imagenet", pool: str = "none", device: str = "cpu", autocast: str = "none"):
        super().__init__()
        BackboneConfig(weights=weights, pool=pool, autocast=autocast)  # the config's vocabularies
        net = _load_backbone(weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.weights = weights
        self.pool = pool
        self.device = torch.device(device)
        self.autocast = autocast_for(autocast, self.device.type)  # the precision used: fp32 off CUDA
        self.eval().to(self.device)
        if self.device.type == "cuda":
            self.to(memory_format=torch.channels_last)

    def describe(self) -> dict[str, Any]:
        """What is needed to rebuild this extractor (stored in bank metadata)."""
        info: dict[str, Any] = {"name": "wide_resnet50_2", "weights": self.weights, "pool": self.pool}
        if self.weights == "none":
            info["random_init_seed"] = RANDOM_INIT_SEED
            info["random_init"] = RANDOM_INIT_SCHEME
        elif self.weights != "imagenet":
            info["weights_sha256"] = file_sha256(Path(self.weights))
        return info

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.autocast)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            f2, f3 = backbone_layers(self, images)
        return patch_head(f2.float(), f3.float(), self.pool).contiguous()
