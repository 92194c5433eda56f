"""Transfer learning: the convolutional blocks of a trained network, frozen, under a new head.

The base is (a) a network this pipeline logged to MLflow (`models:/<name>@champion`, `models:/<name>/<v>`,
`runs:/<id>/model` or a run id; the caller fetches its checkpoint and passes it as `base_checkpoint`), (b) a torchvision model with pretrained weights (`torchvision:resnet18`),
from the local torch cache unless `download` is allowed, or (c) nothing: an untrained `base_arch`, the
from-scratch reference with the same architecture. An optional fine-tune phase unfreezes the base's last
`fine_tune_blocks` blocks after `fine_tune_after` epochs, at `fine_tune_lr` x the head's learning rate.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.options import TransferOptions
from models.registry import create_model, register_model


class TransferNet(nn.Module):
    def __init__(self, features: nn.Sequential, input_shape, num_classes: int, o: TransferOptions,
                 base_channels: int | None = None):
        super().__init__()
        self.o = o
        self.in_channels = input_shape[0]
        self.base_channels = base_channels or self.in_channels  # what the base's first conv expects
        if self.base_channels not in (self.in_channels, 3):
            raise ValueError(f"transfer: the base takes {self.base_channels}-channel inputs, the data has "
                             f"{self.in_channels}; use a base trained on {self.in_channels}-channel data")
        self.features = features
        with torch.no_grad():
            width = self.features.eval()(self._adapt(torch.zeros(1, *input_shape))).shape[1]
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if o.hidden:
            layers += [nn.Linear(width, o.hidden), nn.ReLU()]
            width = o.hidden
        layers += [nn.Dropout(o.dropout) if o.dropout else nn.Identity(), nn.Linear(width, num_classes)]
        self.head = nn.Sequential(*layers)
        self.features.requires_grad_(o.trainable)
        self.resolved_options = o.model_dump()  # train_stage records these (a pinned `base`)

    @property
    def fresh(self) -> nn.Module:  # what `train.init` may re-initialise: never pretrained weights
        return self if self.o.base is None else self.head

    def _adapt(self, x):  # grey images into an RGB base: the same plane three times
        return x.expand(-1, 3, -1, -1) if self.base_channels == 3 and self.in_channels == 1 else x

    def forward(self, x):  # (B, C, H, W) -> (B, classes)
        return self.head(self.features(self._adapt(x)))

    @property
    def first_conv(self) -> nn.Conv2d:
        return next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))

    def fine_tuned(self) -> list[nn.Module]:
        n = 0 if self.o.trainable else self.o.fine_tune_blocks
        return list(self.features.children())[-n:] if n else []

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's groups: the head (and a trainable base) at `lr`; fine-tuned blocks at a fraction.
        Frozen parameters are in no group, so no optimizer (or weight decay) can touch them."""
        main = list(self.head.parameters()) + (list(self.features.parameters()) if self.o.trainable else [])
        groups = [{"params": main, "lr": lr}]
        tuned = [p for block in self.fine_tuned() for p in block.parameters()]
        if tuned:
            groups.append({"params": tuned, "lr": lr * self.o.fine_tune_lr})
        return groups

    def on_epoch_start(self, epoch: int) -> None:  # epochs done so far -> which blocks learn
        for block in self.fine_tuned():
            block.requires_grad_(epoch >= self.o.fine_tune_after)
        self.train(self.training)

    def train(self, mode: bool = True):
        # Frozen blocks stay in inference mode (batch-norm statistics too), as Keras does for trainable=False.
        super().train(mode)
        if mode:
            for block in self.features.children():
                if not any(p.requires_grad for p in block.parameters()):
                    block.eval()
        return self


def _logged_features(ref: str, checkpoint: dict | str | None) -> tuple[nn.Sequential, int]:
    if checkpoint is None:
        raise ValueError(f"transfer: base {ref!r} names a logged model; build it through the pipeline "
                         "(tasks.stages.build fetches its checkpoint) or pass base_checkpoint")
    final = checkpoint if isinstance(checkpoint, dict) else torch.load(checkpoint, map_location="cpu",
                                                                       weights_only=True)
    net = create_model(final["arch"], input_shape=tuple(final["input_shape"]), num_classes=final["num_classes"],
                       **final["options"])
    net.load_state_dict(final["model"])
    if not isinstance(getattr(net, "features", None), nn.Sequential):
        raise ValueError(f"transfer: {ref} is a {final['arch']} without convolutional `features` blocks; "
                         "use a CNN trained by this pipeline")
    first = next(m for m in net.features.modules() if isinstance(m, nn.Conv2d))
    return net.features, first.in_channels


def torchvision_weights_path(arch: str) -> tuple[object, Path]:
    """(torchvision's DEFAULT weights enum for `arch`, where the torch cache keeps their file)."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _torchvision_features(arch: str, download: bool) -> nn.Sequential:
    import torchvision

    try:
        weights, path = torchvision_weights_path(arch)
    except (ValueError, KeyError):
        raise ValueError(f"transfer: torchvision has no model {arch!r} with pretrained weights; see "
                         "torchvision.models.list_models()") from None
    if not path.is_file() and not download:
        raise FileNotFoundError(
            f"transfer: pretrained weights for torchvision:{arch} are not in the local torch cache: {path} is "
            "missing (torchvision looks in $TORCH_HOME/hub/checkpoints; TORCH_HOME defaults to ~/.cache/torch). "
            f"Copy the file there, or allow the download with `--set models.<run>.download=true`.")
    net = torchvision.models.get_model(arch, weights=weights)
    if hasattr(net, "layer4"):  # ResNets: stem, then the four stages as blocks
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return nn.Sequential(stem, net.layer1, net.layer2, net.layer3, net.layer4)
    if isinstance(getattr(net, "features", None), nn.Sequential):  # VGG, MobileNet, EfficientNet, ...
        return net.features
    raise ValueError(f"transfer: don't know the convolutional blocks of torchvision:{arch}; "
                     "use a ResNet, VGG or MobileNet")


@register_model("transfer", family="transfer")
def transfer(*, input_shape, num_classes, options: TransferOptions) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"transfer needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    o = options
    if o.base is None:
        base = create_model(o.base_arch, input_shape=input_shape, num_classes=num_classes, **o.base_options)
        if not isinstance(getattr(base, "features", None), nn.Sequential):
            raise ValueError(f"transfer: base_arch {o.base_arch!r} has no convolutional `features` blocks")
        return TransferNet(base.features, input_shape, num_classes, o)
    if o.base.startswith("torchvision:"):
        return TransferNet(_torchvision_features(o.base.split(":", 1)[1], o.download), input_shape, num_classes,
                           o, base_channels=3)
    features, channels = _logged_features(o.base, o.base_checkpoint)
    return TransferNet(features, input_shape, num_classes, o, base_channels=channels)
