"""Dense networks: Flatten -> [Linear -> (BatchNorm) -> activation -> (Dropout)] x N -> Linear."""
from __future__ import annotations

import math

from torch import nn

from models.options import MLPOptions
from models.registry import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, o: MLPOptions):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in o.hidden:
            layers.append(nn.Linear(width, h, bias=not o.batch_norm))
            if o.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[o.activation]())
            if o.dropout > 0:
                layers.append(nn.Dropout(o.dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, H, W) or (B, F) -> (B, classes)
        return self.net(x)


@register_model("mlp", family="mlp")
def mlp(*, input_shape, num_classes, options: MLPOptions) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes, options)
