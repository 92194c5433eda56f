"""One registry for every architecture: `@register_model` on a small builder, `create_model(name, ...)`.

What architectures exist, with their family, kind, description and pydantic options class, is models/options.py's
catalogue (torch-free, so `params.yaml` is checked without importing a network; unknown option -> error naming
it). A family module attaches each builder with `@register_model`; a builder receives the data shape
(`input_shape`, `num_classes`) and its validated options object. `create_model` imports only the family module of
the architecture it builds (an `mlp` run never imports torchvision).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from models.options import (FAMILIES, MODELS, ModelSpec, Options, UnknownModelError,  # noqa: F401 (re-exported)
                            get_spec, list_models)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, *, family: str):
    """Attach the builder of `name`, an architecture of `family` in models/options.py's catalogue."""
    if name not in MODELS:
        raise ValueError(f"model {name!r} is not in models/options.py MODELS; known models: {', '.join(sorted(MODELS))}")
    if MODELS[name].family != family:
        raise ValueError(f"model {name!r} is of family {MODELS[name].family!r} in models/options.py, not {family!r}")

    def wrap(build: Callable[..., nn.Module]):
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered; known models: {', '.join(sorted(MODELS))}")
        _BUILDERS[name] = build
        return build

    return wrap


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build `name` for inputs of `input_shape` (without batch) and `num_classes` outputs."""
    spec = get_spec(name)
    opts = spec.options(**options)
    if name not in _BUILDERS:
        importlib.import_module(spec.module)  # its @register_model attaches the builder
    if name not in _BUILDERS:
        raise ValueError(f"model {name!r}: {spec.module} registers no builder for it")
    return _BUILDERS[name](input_shape=tuple(input_shape), num_classes=num_classes, options=opts)


def beam_size(model: nn.Module) -> int:
    """A decoding model's `beam_size` option (translation, speech): 1, greedy, for every other model."""
    return getattr(getattr(model, "o", None), "beam_size", 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Deployed(nn.Module):
    """What gets logged and served: raw inputs -> normalisation -> network -> class probabilities, or for a
    forecaster, raw windows (B, L, 1) -> the next H values in the series' units."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], regression: bool = False,
                 input_dims: int = 3):
        super().__init__()
        self.net, self.regression = net, regression
        shape = (1, -1, 1, 1) if input_dims == 3 else (1, 1, -1) if input_dims == 2 else (1, -1)  # per channel/feature
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x):  # (B, C, H, W) raw pixel values | (B, T) token ids -> (B, classes) probabilities
        if not x.is_floating_point():  # token ids: indices, not measurements
            return torch.softmax(self.net(x).float(), dim=-1)  # (B, V), or (B, T, V) from a word LM
        x = (x.float() - self.mean) / self.std
        out = self.net(x).float()
        if self.regression:  # standardised forecasts back to the series' units
            return out * self.std.flatten()[0] + self.mean.flatten()[0]
        return torch.softmax(out, dim=-1)
