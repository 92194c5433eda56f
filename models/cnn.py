"""Convolutional networks: `simple_cnn` (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense), `vgg`, `resnet`,
`inception` and `mobilenet`.

Every CNN here is `head(features(x))`: `features` is an nn.Sequential of successive blocks (the stem, or the
first conv block, first: `features[0]` holds the first-layer kernels, also reachable as `first_conv`), and
`head` is the classifier (global pooling or flatten, then linear layers). Transfer learning and the
visualisations rely on that split.

All of them take 1 or 3 channels and 8x8 to 64x64 inputs: they halve the map only while it is at least
MIN_DOWNSAMPLE wide, so 8x8 digits end at 2x2 instead of vanishing.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from models.mlp import ACTIVATIONS
from models.options import InceptionOptions, MobileNetOptions, ResNetOptions, SimpleCNNOptions, VGGOptions
from models.registry import register_model

MIN_DOWNSAMPLE = 4  # halve a map only while it is at least this wide (so it ends >= 2x2)


class CNN(nn.Module):
    """Base of the CNNs: forward = head(features(x))."""

    features: nn.Sequential
    head: nn.Sequential

    @property
    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))

    def forward(self, x):  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


def gap_head(channels: int, num_classes: int, dropout: float = 0.0, dense: int = 0,
             activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Global average pooling -> (Dropout) -> (Linear(dense) -> activation) -> Linear(classes)."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, C, H, W) -> (B, C)
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    if dense:
        layers += [nn.Linear(channels, dense), activation()]
        channels = dense
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


def image_shape(name: str, input_shape) -> tuple[int, int]:
    """(channels, smaller side) of a (C, H, W) input; anything else is an error naming the model."""
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return input_shape[0], min(input_shape[1:])


def adapt_stride(stride: int, size: int) -> int:
    return stride if size >= 4 * MIN_DOWNSAMPLE else 1  # a small input keeps its resolution


def conv_act(activation: str) -> dict:
    # Conv2dNormActivation passes inplace= to the activation; only ReLU-like ones accept it
    return {"activation_layer": ACTIVATIONS[activation], "inplace": True if activation in ("relu", "leaky_relu") else None}


# ---------------------------------------------------------------- blocks
# torchvision's three small blocks, written out: importing torchvision costs ~2 s (its ops pull in torch._dynamo),
# on the way to every CNN run's first epoch. Same submodules, names and construction order as torchvision's, so
# the state_dict keys and the seeded initial weights are identical (tests/test_cnn.py checks both).

class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: Conv2d -> (norm) -> (activation); bias only without a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU,
                 dilation: int = 1, inplace: bool | None = True, bias: bool | None = None):
        padding = (kernel_size - 1) // 2 * dilation if padding is None else padding
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                                             groups=groups, bias=norm_layer is None if bias is None else bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(**({} if inplace is None else {"inplace": inplace})))
        super().__init__(*layers)
        self.out_channels = out_channels


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: (1x1 expand) -> 3x3 depthwise -> 1x1 linear projection, + x when the
    shape allows."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, kernel_size=1, activation_layer=nn.ReLU6))
        layers += [Conv2dNormActivation(hidden, hidden, stride=stride, groups=hidden, activation_layer=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# ---------------------------------------------------------------- simple_cnn

class SimpleCNN(CNN):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: SimpleCNNOptions):
        super().__init__()
        channels, size = input_shape[0], min(input_shape[1:])
        blocks: list[nn.Module] = []
        for i, width in enumerate(o.filters):
            layers: list[nn.Module] = []  # one block: (pool) conv (bn) activation
            if i > 0 and size >= 2:  # pool between convs, as long as there is something left to pool
                layers.append(nn.MaxPool2d(2) if o.pooling == "max" else nn.AvgPool2d(2))
                size //= 2
            pad = o.kernel_size // 2 if o.padding == "same" else 0
            if o.padding == "valid" and size < o.kernel_size:
                raise ValueError(
                    f"simple_cnn: input {tuple(input_shape)} is too small for {len(o.filters)} 'valid' "
                    f"convolutions of size {o.kernel_size}; use padding 'same' or fewer filters"
                )
            layers.append(nn.Conv2d(channels, width, o.kernel_size, stride=o.stride, padding=pad, bias=not o.batch_norm))
            if o.batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(ACTIVATIONS[o.activation]())
            blocks.append(nn.Sequential(*layers))
            size = (size + 2 * pad - o.kernel_size) // o.stride + 1
            channels = width
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(o.dropout) if o.dropout > 0 else nn.Identity(),
            nn.Linear(flat, o.dense),
            ACTIVATIONS[o.activation](),
            nn.Linear(o.dense, num_classes),
        )


@register_model("simple_cnn", family="cnn")
def simple_cnn(*, input_shape, num_classes, options: SimpleCNNOptions) -> nn.Module:
    image_shape("simple_cnn", input_shape)
    return SimpleCNN(input_shape, num_classes, options)


# ---------------------------------------------------------------- vgg

class VGG(CNN):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: VGGOptions):
        super().__init__()
        channels, size = image_shape("vgg", input_shape)
        pad = 1 if o.padding == "same" else 0
        norm = nn.BatchNorm2d if o.batch_norm else None
        stages: list[nn.Module] = []
        for i, width in enumerate(o.blocks):
            layers: list[nn.Module] = []  # one stage: (pool) [conv3x3 (bn) activation] x convs_per_block
            down = i > 0 and size >= MIN_DOWNSAMPLE
            if down and o.pooling != "stride":
                layers.append(nn.MaxPool2d(2) if o.pooling == "max" else nn.AvgPool2d(2))
                size //= 2
            for j in range(o.convs_per_block):
                stride = 2 if down and o.pooling == "stride" and j == 0 else 1
                if size + 2 * pad < 3:
                    raise ValueError(f"vgg: input {tuple(input_shape)} is too small for {len(o.blocks)} stages of "
                                     f"{o.convs_per_block} 'valid' 3x3 convolutions; use padding 'same' or fewer blocks")
                layers.append(Conv2dNormActivation(channels, width, 3, stride=stride, padding=pad, norm_layer=norm,
                                                   **conv_act(o.activation)))
                size = (size + 2 * pad - 3) // stride + 1
                channels = width
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.head = gap_head(channels, num_classes, o.dropout, o.dense, ACTIVATIONS[o.activation])


@register_model("vgg", family="cnn")
def vgg(*, input_shape, num_classes, options: VGGOptions) -> nn.Module:
    return VGG(input_shape, num_classes, options)


# ---------------------------------------------------------------- resnet

class PlainBlock(BasicBlock):
    """BasicBlock without its shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class ResNet(CNN):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: ResNetOptions):
        super().__init__()
        channels, size = image_shape("resnet", input_shape)
        stride = adapt_stride(o.stem_stride, size)
        stem = Conv2dNormActivation(channels, o.width, 3, stride=stride)
        size = (size - 1) // stride + 1
        stages: list[nn.Module] = [stem]
        channels, n = o.width, (o.depth - 2) // 6
        for i in range(3):
            planes = o.width * 2 ** i
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 and size >= MIN_DOWNSAMPLE else 1
                if not o.skip:
                    blocks.append(PlainBlock(channels, planes, stride))
                else:
                    project = stride != 1 or channels != planes  # 1x1 conv shortcut where the shape changes
                    down = nn.Sequential(nn.Conv2d(channels, planes, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes)) if project else None
                    blocks.append(BasicBlock(channels, planes, stride, down))
                size = (size - 1) // stride + 1
                channels = planes
            stages.append(nn.Sequential(*blocks))
        self.features = nn.Sequential(*stages)
        self.head = gap_head(channels, num_classes, o.dropout)


@register_model("resnet", family="cnn")
def resnet(*, input_shape, num_classes, options: ResNetOptions) -> nn.Module:
    return ResNet(input_shape, num_classes, options)


# ---------------------------------------------------------------- inception

class InceptionBlock(nn.Module):
    """GoogLeNet's block: parallel 1x1, 1x1->3x3, 1x1->5x5 and maxpool3x3->1x1 branches, concatenated."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool):
        super().__init__()
        cna = partial(Conv2dNormActivation, norm_layer=nn.BatchNorm2d if batch_norm else None)
        q = out_ch // 16
        self.branch1 = cna(in_ch, 4 * q, 1)
        self.branch3 = nn.Sequential(cna(in_ch, 4 * q, 1), cna(4 * q, 8 * q, 3))
        self.branch5 = nn.Sequential(cna(in_ch, q, 1), cna(q, 2 * q, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), cna(in_ch, 2 * q, 1))

    def forward(self, x):  # (B, in, H, W) -> (B, out, H, W)
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class Inception(CNN):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: InceptionOptions):
        super().__init__()
        channels, size = image_shape("inception", input_shape)
        stride = adapt_stride(o.stem_stride, size)
        norm = nn.BatchNorm2d if o.batch_norm else None
        stages: list[nn.Module] = [Conv2dNormActivation(channels, o.stem, 3, stride=stride, norm_layer=norm)]
        size, channels = (size - 1) // stride + 1, o.stem
        for i, width in enumerate(o.stages):
            layers: list[nn.Module] = []
            if i > 0 and size >= MIN_DOWNSAMPLE:
                layers.append(nn.MaxPool2d(2) if o.pooling == "max" else nn.AvgPool2d(2))
                size //= 2
            for _ in range(o.blocks_per_stage):
                layers.append(InceptionBlock(channels, width, o.batch_norm))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stages)
        self.head = gap_head(channels, num_classes, o.dropout)


@register_model("inception", family="cnn")
def inception(*, input_shape, num_classes, options: InceptionOptions) -> nn.Module:
    return Inception(input_shape, num_classes, options)


# ---------------------------------------------------------------- mobilenet

def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% down (MobileNet's rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class MobileNet(CNN):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: MobileNetOptions):
        super().__init__()
        channels, size = image_shape("mobilenet", input_shape)
        stride = adapt_stride(o.stem_stride, size)
        width = make_divisible(o.stem * o.width_mult)
        stages: list[nn.Module] = [Conv2dNormActivation(channels, width, 3, stride=stride, activation_layer=nn.ReLU6)]
        size, channels = (size - 1) // stride + 1, width
        for i, (c, n, s) in enumerate(o.stages):
            width, blocks = make_divisible(c * o.width_mult), []
            for j in range(n):
                stride = s if j == 0 and size >= MIN_DOWNSAMPLE else 1
                blocks.append(InvertedResidual(channels, width, stride, 1 if i == 0 else o.expand_ratio))
                size, channels = (size - 1) // stride + 1, width
            stages.append(nn.Sequential(*blocks))
        last = make_divisible(o.last * max(1.0, o.width_mult))  # as torchvision: never thinner than `last`
        stages.append(Conv2dNormActivation(channels, last, 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*stages)
        self.head = gap_head(last, num_classes, o.dropout)


@register_model("mobilenet", family="cnn")
def mobilenet(*, input_shape, num_classes, options: MobileNetOptions) -> nn.Module:
    return MobileNet(input_shape, num_classes, options)
