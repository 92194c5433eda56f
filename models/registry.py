"""One registry for every architecture: `@register_model` on a small builder, `create_model(name, ...)`.

A builder receives the data shape (`input_shape`, `num_classes`) and its validated options object.
Each registration carries a pydantic options class, so `params.yaml` is checked against the same
definition that builds the network (unknown option -> error naming it).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict
import torch
from torch import nn

FAMILIES = ("mlp", "cnn", "rnn", "transformer", "gan", "transfer", "seq2seq", "speech")


class Options(BaseModel):
    """Base of every architecture's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    options: type[Options]
    build: Callable[..., nn.Module]
    description: str
    kind: str | None = None  # the kind of run it makes whatever the data (GANs: "generation"); None: the data's


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_model(name: str, *, family: str, options: type[Options], kind: str | None = None):
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")

    def wrap(build: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; known models: {', '.join(sorted(_REGISTRY))}")
        doc = (build.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = ModelSpec(name, family, options, build, doc[0] if doc else "", kind)
        return build

    return wrap


def _load_families() -> None:
    # Importing the family modules runs their @register_model decorators.
    from models import cnn, gan, image2image, mlp, seq2seq, sequence, speech, stylegan, transfer  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **options) -> nn.Module:
    """Build `name` for inputs of `input_shape` (without batch) and `num_classes` outputs."""
    spec = get_spec(name)
    opts = spec.options(**options)
    return spec.build(input_shape=tuple(input_shape), num_classes=num_classes, options=opts)


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
