"""Convolutional networks. `simple_cnn` is the classic Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense(classes)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from models.mlp import ACTIVATIONS, Activation
from models.registry import Options, register_model


class SimpleCNNOptions(Options):
    filters: list[int] = Field(default=[32, 64, 64], min_length=1)  # one conv per entry, pooling between
    kernel_size: int = Field(default=3, ge=1, le=7)
    padding: Literal["same", "valid"] = "same"  # `same` keeps 8x8 digits from shrinking to nothing
    stride: int = Field(default=1, ge=1, le=2)
    pooling: Literal["max", "avg"] = "max"
    dense: int = Field(default=64, ge=1)  # width of the hidden dense layer
    activation: Activation = "relu"
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)  # before the hidden dense layer
    batch_norm: bool = False  # BatchNorm2d after each conv


class SimpleCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, o: SimpleCNNOptions):
        super().__init__()
        channels, size = input_shape[0], min(input_shape[1:])
        layers: list[nn.Module] = []
        for i, width in enumerate(o.filters):
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
            size = (size + 2 * pad - o.kernel_size) // o.stride + 1
            channels = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(o.dropout) if o.dropout > 0 else nn.Identity(),
            nn.Linear(flat, o.dense),
            ACTIVATIONS[o.activation](),
            nn.Linear(o.dense, num_classes),
        )

    def forward(self, x):  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(x))


@register_model("simple_cnn", family="cnn", options=SimpleCNNOptions)
def simple_cnn(*, input_shape, num_classes, options: SimpleCNNOptions) -> nn.Module:
    """The classic small CNN: three convolutions with pooling, then two dense layers."""
    if len(input_shape) != 3:
        raise ValueError(f"simple_cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return SimpleCNN(input_shape, num_classes, options)
