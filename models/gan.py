"""Generative adversarial networks: `gan_mlp` (Goodfellow et al. 2014), `dcgan` (Radford et al. 2016) and
`wgan_gp` (Gulrajani et al. 2017).

Every GAN here is one module holding two networks: `generator` (z (B, latent_dim) -> a sample shaped like the
data) and `discriminator` (a sample -> (B, 1) logit, or a critic score for wgan_gp). `forward(x)` is the
discriminator, so the registry's generic code can call any model on data; `sample(n)` draws from the generator.
The discriminator is `head(features(x))` like the CNNs: `features` gives the penultimate activations that
feature matching compares.

Data comes as images (C, H, W) scaled to [-1, 1] by the caller (the generator ends with tanh), or as points
(D,) in their own units (linear output: e.g. the 2-D ring of Gaussians `ring8`). dcgan and wgan_gp use
convolutions on images and dense networks on points; gan_mlp is dense on both.

The training step itself (D then G, gradient penalty, n_critic) is in tasks/kinds/gan.py; the knobs the textbook
names against instability live in their options (models/options.py), so `params.yaml` sets them per
architecture.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from models.options import DCGANOptions, GANMLPOptions, GANOptions, WGANGPOptions
from models.registry import register_model

# ---------------------------------------------------------------- the two-network module


class Generator(nn.Module):
    def __init__(self, net: nn.Module, out_shape: tuple[int, ...]):
        super().__init__()
        self.net, self.out_shape = net, out_shape

    def forward(self, z):  # (B, latent) -> (B, *out_shape)
        return self.net(z).view(z.shape[0], *self.out_shape)  # z.shape[0], not len(z): export keeps B dynamic


class Discriminator(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):  # (B, *shape) -> (B, 1) logit or critic score
        return self.head(self.features(x))


class GAN(nn.Module):
    def __init__(self, generator: Generator, discriminator: Discriminator, latent_dim: int, options: GANOptions,
                 kind: Literal["bce", "wasserstein"]):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.latent_dim, self.options, self.kind = latent_dim, options, kind

    def forward(self, x):  # (B, *shape) data -> (B, 1) discriminator logits / critic scores
        return self.discriminator(x)

    @property
    def sampling_generator(self) -> nn.Module:
        """What samples are drawn from: the moving average of G's weights where the GAN keeps one, else G."""
        ema = getattr(self, "generator_ema", None)
        return ema if ema is not None else self.generator

    def features(self, x):  # (B, *shape) -> (B, F): D's penultimate activations
        return self.discriminator.features(x)

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # drawn where `generator` lives (a CPU generator for a CUDA model is fine), then moved to the model
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=generator.device if generator else device)
        return z.to(device)  # (n, latent)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # eval mode for batch norm's running statistics (a batch of 1 works), then back to what it was
        G = self.sampling_generator
        was_training = G.training
        G.eval()
        x = G(self.noise(n, generator))
        G.train(was_training)
        return x  # (n, *shape); images in [-1, 1]


# ---------------------------------------------------------------- dense networks (points; gan_mlp on images)


def dense_generator(latent: int, hidden: list[int], out_shape: tuple[int, ...], batch_norm: bool,
                    act: type[nn.Module], tanh: bool) -> Generator:
    layers: list[nn.Module] = []
    width = latent
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(act())
        width = h
    layers.append(nn.Linear(width, math.prod(out_shape)))
    if tanh:
        layers.append(nn.Tanh())  # images live in [-1, 1]; points keep a linear output
    return Generator(nn.Sequential(*layers), out_shape)


def dense_discriminator(in_shape: tuple[int, ...], hidden: list[int], norm: Literal["batch", "layer", "none"]):
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(in_shape)
    for i, h in enumerate(hidden):
        layers.append(nn.Linear(width, h))
        if norm == "batch" and i > 0:  # never on the first layer (DCGAN: it destabilises the data statistics)
            layers.append(nn.BatchNorm1d(h))
        elif norm == "layer":
            layers.append(nn.LayerNorm(h))
        layers.append(nn.LeakyReLU(0.2))
        width = h
    return Discriminator(nn.Sequential(*layers), nn.Linear(width, 1))


# ---------------------------------------------------------------- convolutional networks (images)


def conv_plan(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    # Halve both sides while they stay even and >= 4: 8x8 -> 4x4 (1 halving), 28 -> 7 (2), 32 -> 4 (3), 64 -> 4 (4).
    # The generator starts from that base and doubles back up exactly: no cropping, no odd sizes.
    _, h, w = shape
    k = 0
    while h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        h, w, k = h // 2, w // 2, k + 1
    if k == 0:
        raise ValueError(f"{name}: image {tuple(shape)} cannot be halved to a base of at least 4x4; use gan_mlp")
    return h, w, k


def conv_generator(latent: int, shape: tuple[int, ...], channels: int, name: str) -> Generator:
    # z -> Linear -> (ch * 2^k, bh, bw) -> k x [ConvT 4x4 stride 2 -> BN -> ReLU] -> Conv 3x3 -> tanh
    bh, bw, k = conv_plan(name, shape)
    ch = channels * 2 ** k
    layers: list[nn.Module] = [nn.Linear(latent, ch * bh * bw, bias=False), nn.BatchNorm1d(ch * bh * bw), nn.ReLU(True),
                               nn.Unflatten(1, (ch, bh, bw))]
    for _ in range(k):
        layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
        ch //= 2  # (B, ch, h, w) -> (B, ch / 2, 2h, 2w)
    layers += [nn.Conv2d(ch, shape[0], 3, padding=1), nn.Tanh()]  # to the image's channels, in [-1, 1]
    return Generator(nn.Sequential(*layers), tuple(shape))


def conv_discriminator(shape: tuple[int, ...], channels: int, norm: Literal["batch", "layer", "none"],
                       name: str) -> Discriminator:
    # Conv 3x3 -> LeakyReLU (no norm on the first layer) -> k x [Conv 4x4 stride 2 -> norm -> LeakyReLU] -> Linear
    bh, bw, k = conv_plan(name, shape)
    ch = channels
    layers: list[nn.Module] = [nn.Conv2d(shape[0], ch, 3, padding=1), nn.LeakyReLU(0.2, True)]
    for _ in range(k):
        layers.append(nn.Conv2d(ch, 2 * ch, 4, 2, 1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(2 * ch))
        elif norm == "layer":
            layers.append(nn.GroupNorm(1, 2 * ch))  # one group = layer norm over (C, H, W), per-channel affine
        layers.append(nn.LeakyReLU(0.2, True))
        ch *= 2  # (B, ch, h, w) -> (B, 2 ch, h / 2, w / 2)
    layers.append(nn.Flatten())  # (B, ch * bh * bw): the features feature matching compares
    return Discriminator(nn.Sequential(*layers), nn.Linear(ch * bh * bw, 1))


def dcgan_init(model: nn.Module) -> nn.Module:
    # Radford et al.: conv and linear weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def is_image(shape: tuple[int, ...]) -> bool:
    if len(shape) not in (1, 3):
        raise ValueError(f"GANs take images (C, H, W) or points (D,); got shape {tuple(shape)}")
    return len(shape) == 3


# ---------------------------------------------------------------- registered variants


@register_model("gan_mlp", family="gan")
def gan_mlp(*, input_shape, num_classes, options: GANMLPOptions) -> nn.Module:
    image = is_image(input_shape)
    act = nn.ReLU if options.activation == "relu" else lambda: nn.LeakyReLU(0.2)
    g = dense_generator(options.latent_dim, options.hidden, input_shape, options.batch_norm, act, tanh=image)
    d = dense_discriminator(input_shape, options.hidden[::-1], "none")
    return GAN(g, d, options.latent_dim, options, "bce")


@register_model("dcgan", family="gan")
def dcgan(*, input_shape, num_classes, options: DCGANOptions) -> nn.Module:
    if is_image(input_shape):
        g = conv_generator(options.latent_dim, input_shape, options.channels, "dcgan")
        d = conv_discriminator(input_shape, options.channels, "batch", "dcgan")
    else:
        g = dense_generator(options.latent_dim, options.hidden, input_shape, True, nn.ReLU, tanh=False)
        d = dense_discriminator(input_shape, options.hidden[::-1], "batch")
    return dcgan_init(GAN(g, d, options.latent_dim, options, "bce"))


@register_model("wgan_gp", family="gan")
def wgan_gp(*, input_shape, num_classes, options: WGANGPOptions) -> nn.Module:
    if is_image(input_shape):
        g = conv_generator(options.latent_dim, input_shape, options.channels, "wgan_gp")
        d = conv_discriminator(input_shape, options.channels, options.critic_norm, "wgan_gp")
    else:
        g = dense_generator(options.latent_dim, options.hidden, input_shape, True, nn.ReLU, tanh=False)
        d = dense_discriminator(input_shape, options.hidden[::-1], options.critic_norm)
    return GAN(g, d, options.latent_dim, options, "wasserstein")
