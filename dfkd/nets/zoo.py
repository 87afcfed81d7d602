"""The model zoo: the teachers and students of the data-free KD literature, registered by name.

Every model returns logits ``(N, num_classes)`` and contains BatchNorm, because
data-free methods match the teacher's BN running statistics; the one exception is LeNet-5 with
``batchnorm=False``, the pair DAFL and DFAD used. Models take no
"return features" flags: their submodules have meaningful paths (``conv1``,
``layer3``, ``layer3.1.bn2``, ``fc``) and features are read with the hooks in
:mod:`dfkd.nets.taps`. No ReLU is in-place, so a hooked BN output is not overwritten
by the activation that follows it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.nets.models import MODELS, init_weights
from dfkd_base.errors import ConfigError, ShapeError


def conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution here feeds a BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)


class LeNet5(nn.Sequential):
    """LeNet-5 with BatchNorm after each convolution. ``batchnorm=False`` gives the LeNet-5 of
    DAFL's and DFAD's code: no BatchNorm, convolutions with biases.

    Paths: ``conv1 bn1 relu1 pool1 conv2 bn2 relu2 pool2 conv3 bn3 relu3 fc1 relu4 fc2`` (no
    ``bn*`` without BatchNorm); ``relu3`` is the 120-d penultimate feature map, ``relu4`` the 84-d
    hidden layer.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32,
                 channels: tuple[int, int, int, int] = (6, 16, 120, 84), batchnorm: bool = True,
                 kernels: tuple[int, int] = (5, 5)):
        if not 28 <= image_size <= 32:
            raise ShapeError(f"LeNet-5 takes 28..32 pixel images (conv3 needs a 5x5 map), got image_size={image_size}")
        c1, c2, c3, hidden = channels
        k1, k2 = kernels
        # Padding ceil((32 - size) / 2) brings every size in 28..32 to the 5x5 map conv3 expects
        # (28 -> 2, the classic MNIST LeNet); floor would leave odd sizes one pixel short.
        padding = (33 - image_size) // 2
        # conv3 covers whatever map conv1/conv2 leave (5x5 with the paper's 5x5 kernels), so it stays
        # the fully connected layer over the map that LeNet-5's C5 is, whatever the kernels
        k3 = ((image_size + 2 * padding - k1 + 1) // 2 - k2 + 1) // 2
        if k3 < 1:
            raise ConfigError(f"lenet5: kernels {tuple(kernels)} leave no map for conv3")
        def block(i: int, conv: nn.Conv2d, pool: bool) -> list[tuple[str, nn.Module]]:
            norm = [(f"bn{i}", nn.BatchNorm2d(conv.out_channels))] if batchnorm else []
            return [(f"conv{i}", conv), *norm, (f"relu{i}", nn.ReLU())] + ([(f"pool{i}", nn.MaxPool2d(2))] if pool else [])

        bias = not batchnorm  # a BatchNorm's shift makes a convolution's bias redundant
        super().__init__(OrderedDict(
            block(1, nn.Conv2d(in_channels, c1, k1, padding=padding, bias=bias), True)
            + block(2, nn.Conv2d(c1, c2, k2, bias=bias), True) + block(3, nn.Conv2d(c2, c3, k3, bias=bias), False)
            + [("flatten", nn.Flatten()), ("fc1", nn.Linear(c3, hidden)), ("relu4", nn.ReLU()),
               ("fc2", nn.Linear(hidden, num_classes))]))
        init_weights(self)


class _StagedNet(nn.Module):
    """Stem, then stages registered as ``layer1`` .. ``layerK`` so paths read like ``layer2.0.conv1``."""

    def _add_stages(self, stages: list[nn.Module]) -> None:
        self.num_stages = len(stages)
        for index, stage in enumerate(stages, start=1):
            self.add_module(f"layer{index}", stage)

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, self.num_stages + 1):
            x = self.get_submodule(f"layer{index}")(x)
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a residual; a 1x1 conv + BN projects the shortcut when the shape changes (option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        projected = stride != 1 or in_planes != planes
        self.shortcut = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)) if projected else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(_StagedNet):
    """CIFAR ResNet: 3x3 stride-1 stem without max-pool, BasicBlock stages (the first keeps the
    resolution, the others halve it), global average pool and ``fc``. Works for any input >= 8 pixels.
    """

    def __init__(self, blocks_per_stage: list[int], widths: list[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_planes = [], widths[0]
        for index, (blocks, planes) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                        *(BasicBlock(planes, planes) for _ in range(blocks - 1))))
            in_planes = planes
        self._add_stages(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBlock(nn.Module):
    """Wide-ResNet block: (BN, ReLU, conv) twice, optional dropout between the convolutions."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = conv1x1(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        # As in the reference WRN, a projection shortcut reads the pre-activated input.
        skip = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(_StagedNet):
    """WRN-depth-width (Zagoruyko & Komodakis): three pre-activation stages of width 16k, 32k, 64k,
    then ``bn``, ReLU, global average pool and ``fc``.
    """

    def __init__(self, depth: int, width: int, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
            raise ConfigError(f"wrn{depth}_{width}: depth must be 6n+4 with n >= 1 (16, 22, 28, 40 ...) "
                              f"and width >= 1")
        blocks = (depth - 4) // 6
        self.conv1 = conv3x3(in_channels, 16)
        stages, in_planes = [], 16
        for index, planes in enumerate((16 * width, 32 * width, 64 * width)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(PreActBlock(in_planes, planes, stride, dropout),
                                        *(PreActBlock(planes, planes, 1, dropout) for _ in range(blocks - 1))))
            in_planes = planes
        self._add_stages(stages)
        self.bn = nn.BatchNorm2d(in_planes)  # pre-activation blocks end un-normalised
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self._run_stages(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor`` without losing more than 10% (the MobileNet rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int, kernel_size: int = 3):
        super().__init__()
        hidden = in_planes * expansion
        self.expand = (nn.Sequential(conv1x1(in_planes, hidden), nn.BatchNorm2d(hidden), nn.ReLU6())
                       if expansion != 1 else nn.Identity())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, kernel_size, stride, kernel_size // 2, groups=hidden,
                                                 bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(conv1x1(hidden, planes), nn.BatchNorm2d(planes))
        self.residual = stride == 1 and in_planes == planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(_StagedNet):
    """CIFAR MobileNetV2: one stage ``layerI`` per row of the paper's (t, c, n, s) table."""

    # The paper's table with the second stage's stride set to 1; with the stride-1 stem a 32x32 input
    # reaches the head at 4x4 instead of the 1x1 the ImageNet strides would leave.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_mult: float = 1.0,
                 stages: tuple = STAGES, kernel_size: int = 3, head: int | None = None):
        super().__init__()
        in_planes = _make_divisible(32 * width_mult)
        self.conv1 = conv3x3(in_channels, in_planes)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU6()
        modules = []
        for expansion, channels, blocks, stride in stages:
            planes = _make_divisible(channels * width_mult)
            modules.append(nn.Sequential(*(InvertedResidual(in_planes if i == 0 else planes, planes,
                                                            stride if i == 0 else 1, expansion, kernel_size)
                                           for i in range(blocks))))
            in_planes = planes
        self._add_stages(modules)
        head = head or _make_divisible(1280 * max(1.0, width_mult))  # the paper never thins the head
        self.conv2 = conv1x1(in_planes, head)
        self.bn2 = nn.BatchNorm2d(head)
        self.relu2 = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_stages(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Factories share the signature (in_channels, num_classes, image_size, **options) so that
# create_model can check options before building; models that adapt to any size ignore image_size.

# Factories share the signature (in_channels, num_classes, image_size, **options) so that
# create_model can check options before building; models that adapt to any size ignore image_size.

@MODELS.register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 32, batchnorm: bool = True,
           width: float = 1.0, channels: Optional[list[int]] = None, kernels: list[int] = (5, 5)) -> nn.Module:
    """``width`` scales every layer's channels (rounded, at least 1): 0.5 is ``lenet5_half``,
    0.125 (1, 2, 15, 10 channels) a student with a real capacity gap to LeNet-5. ``channels``
    (conv1, conv2, conv3, hidden) sets them one by one instead, and ``kernels`` the two first
    convolutions' kernel sizes (conv3 then spans the map they leave): the family a search explores."""
    if not width > 0:
        raise ConfigError(f"lenet5: width must be positive, got {width}")
    if channels is None:
        channels = tuple(max(1, round(c * width)) for c in (6, 16, 120, 84))
    elif width != 1.0:
        raise ConfigError("lenet5: give width or channels, not both")
    _check_ints("lenet5", channels=(channels, 4), kernels=(kernels, 2))
    return LeNet5(in_channels, num_classes, image_size, channels=tuple(channels), batchnorm=batchnorm,
                  kernels=tuple(kernels))


def _check_ints(model: str, **values: tuple[Any, int | None]) -> None:
    """Each option a sequence of positive ints (of the given length, if one is given)."""
    for key, (value, length) in values.items():
        if (not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in value)
                or (length is not None and len(value) != length)):
            size = f"{length} " if length is not None else ""
            raise ConfigError(f"{model}: {key} must be a list of {size}positive integers, got {value!r}")


@MODELS.register("lenet5_half", "lenet5-half")
def lenet5_half(in_channels: int = 1, num_classes: int = 10, image_size: int = 32,
                batchnorm: bool = True) -> nn.Module:
    return lenet5(in_channels, num_classes, image_size, batchnorm, width=0.5)


def _register_resnet(name: str, blocks_per_stage: list[int], widths: list[int]) -> None:
    def factory(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
        return ResNet(blocks_per_stage, widths, in_channels, num_classes)

    MODELS.register(name)(factory)


for _depth in (8, 20, 32, 56):
    _register_resnet(f"resnet{_depth}", [(_depth - 2) // 6] * 3, [16, 32, 64])
_register_resnet("resnet18", [2, 2, 2, 2], [64, 128, 256, 512])
_register_resnet("resnet34", [3, 4, 6, 3], [64, 128, 256, 512])


@MODELS.register("resnet")
def resnet(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, blocks: list[int] = (1, 1, 1),
           widths: list[int] = (16, 32, 64)) -> nn.Module:
    """The CIFAR ResNet family: ``blocks`` BasicBlocks per stage at ``widths`` channels (one entry
    per stage); ``resnet20`` is blocks (3, 3, 3), widths (16, 32, 64)."""
    _check_ints("resnet", blocks=(blocks, None), widths=(widths, len(blocks)))
    return ResNet(list(blocks), list(widths), in_channels, num_classes)


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width_mult: float = 1.0,
                expansion: Optional[int] = None, blocks: Optional[list[int]] = None, kernel_size: int = 3,
                head: Optional[int] = None) -> nn.Module:
    """``expansion`` replaces the paper's ratio 6 (every stage but the first), ``blocks`` its blocks
    per stage (seven entries), ``kernel_size`` the depthwise kernels' size (3, 5, 7), ``head`` the
    last 1x1 convolution's 1280 channels: the dimensions a search varies."""
    stages = list(MobileNetV2.STAGES)
    if expansion is not None:
        _check_ints("mobilenetv2", expansion=([expansion], 1))
        stages = [(t if i == 0 else expansion, c, n, s) for i, (t, c, n, s) in enumerate(stages)]
    if blocks is not None:
        _check_ints("mobilenetv2", blocks=(blocks, len(stages)))
        stages = [(t, c, n, s) for (t, c, _, s), n in zip(stages, blocks)]
    if kernel_size not in (3, 5, 7):
        raise ConfigError(f"mobilenetv2: kernel_size must be 3, 5 or 7, got {kernel_size!r}")
    return MobileNetV2(in_channels, num_classes, width_mult, stages=tuple(stages), kernel_size=kernel_size, head=head)


@MODELS.register("wrn")
def wrn(depth: int = 16, width: int = 2, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
        dropout: float = 0.0) -> nn.Module:
    """WRN-``depth``-``width``; the names ``wrn<depth>_<width>`` (``wrn16_2``) build it too."""
    return WideResNet(depth, width, in_channels, num_classes, dropout)
