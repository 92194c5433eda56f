"""StyleGAN (Karras et al. 2019, "A Style-Based Generator Architecture for GANs"), small enough for CPUs.

The generator is two networks:
- `mapping`: z (B, latent_dim) -> pixel norm -> `mapping_layers` x [Linear -> LeakyReLU(0.2)] -> w (B, w_dim),
  trained at lr x `mapping_lr_mult` (0.01, as in the paper: the mapping is deep and its input moves every step);
- `synthesis`: a learned constant (C, 4, 4) -> two style layers per resolution (4 -> 8 -> 16 -> 32 for 32x32
  data: nearest upsample, 3x3 conv, per-layer noise, LeakyReLU, AdaIN) -> 1x1 conv to the image's channels -> tanh.
  Each style layer reads its own w from `ws` (B, num_ws, w_dim), so coarse layers can take w_A and fine ones w_B.

Coarse and fine: the layers at resolutions up to 8x8 are coarse (at 32x32: 4x4 and 8x8, the first 4 of 8 ws;
pose and shape in the paper, the digit's class here); the layers above are fine (16x16 and 32x32: colour and
stroke). `coarse_layers` is that split: the mixing grid and its metrics (tasks/kinds/style.py) cross over there.

In training mode the generator's forward does the paper's two regularising tricks itself, so tasks/kinds/gan.py's
GanStep trains it like any GAN: style mixing (with probability `mixing_prob` a batch takes a second z's w from a
random layer on) and the running mean of w (`w_avg`, the centre the truncation trick pulls towards). Noise is
fresh per forward in training; in eval mode every layer reads its fixed noise buffer (StyleGAN2's
noise_mode="const"), so a sample depends on z alone and the mixing grid's cells differ only by their styles.

The discriminator is models/gan.py's strided-conv shape without normalisation (what R1 expects) plus the
minibatch standard deviation (Karras et al. 2018), trained with the paper's loss: non-saturating logistic + R1.
Every layer has the paper's equalised learning rate (EqualLinear, EqualConv2d).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.gan import GAN, Discriminator, conv_plan, is_image
from models.options import StyleGANOptions
from models.registry import register_model

COARSE_MAX = 8  # the highest resolution whose style layers count as coarse (the paper: 4x4 and 8x8)


# ---------------------------------------------------------------- equalised learning rate


class EqualLinear(nn.Linear):
    """The paper's equalised learning rate: weights stored N(0, 1) and scaled by gain / sqrt(fan_in) at run time,
    so Adam's steps (about lr whatever a weight's scale) move every layer by the same share of its size; the
    mapping's lower lr (its param group) then means what the paper's lr multiplier means. That N(0, 1) is the
    method, not a choice: `own_init` tells train.init (tasks/train.py init_weights) to leave it."""

    own_init = True

    def __init__(self, cin: int, cout: int, gain: float = math.sqrt(2), bias: float = 0.0):
        super().__init__(cin, cout)
        nn.init.normal_(self.weight)
        nn.init.constant_(self.bias, bias)
        self.scale = gain / math.sqrt(cin)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class EqualConv2d(nn.Conv2d):
    own_init = True  # as EqualLinear's
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, gain: float = math.sqrt(2)):
        super().__init__(cin, cout, kernel, stride, padding)
        nn.init.normal_(self.weight)
        nn.init.zeros_(self.bias)
        self.scale = gain / math.sqrt(cin * kernel * kernel)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, self.stride, self.padding)


# ---------------------------------------------------------------- the generator


class MappingNetwork(nn.Module):
    def __init__(self, latent: int, w_dim: int, layers: int):
        super().__init__()
        dims = [latent] + [w_dim] * layers
        self.net = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (EqualLinear(a, b), nn.LeakyReLU(0.2))])

    def forward(self, z):  # (B, latent) -> (B, w_dim)
        z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-8)  # pixel norm: z on the sphere of radius sqrt(dim)
        return self.net(z)


class StyleLayer(nn.Module):
    """[upsample x2 ->] [3x3 conv ->] + noise -> LeakyReLU -> AdaIN(w): one layer reading one w."""

    def __init__(self, cin: int, cout: int, w_dim: int, size: tuple[int, int], up: bool, conv: bool, noise: bool):
        super().__init__()
        self.up = up
        self.conv = EqualConv2d(cin, cout, 3, padding=1) if conv else None
        self.noise_strength = nn.Parameter(torch.zeros(1, cout, 1, 1)) if noise else None  # learned, from 0
        self.register_buffer("noise_const", torch.randn(1, 1, *size) if noise else torch.zeros(0))  # eval mode's
        self.style = EqualLinear(w_dim, 2 * cout, gain=1.0)  # A: w -> (scale, bias) per channel, around (1 + 0, 0)

    def forward(self, x, w):  # x (B, cin, h, w), w (B, w_dim) -> (B, cout, H, W)
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        if self.noise_strength is not None:
            noise = (torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) if self.training
                     else self.noise_const)  # (B or 1, 1, H, W): one noise image, a learned strength per channel
            x = x + self.noise_strength * noise
        x = F.leaky_relu(x, 0.2)
        scale, bias = self.style(w)[:, :, None, None].chunk(2, 1)  # (B, cout, 1, 1) each
        return F.instance_norm(x) * (1 + scale) + bias  # AdaIN: the style replaces the channel statistics


class Synthesis(nn.Module):
    def __init__(self, shape: tuple[int, ...], channels: int, w_dim: int, noise: bool, name: str):
        super().__init__()
        bh, bw, k = conv_plan(name, shape)
        ch = channels * 2 ** k
        self.const = nn.Parameter(torch.ones(1, ch, bh, bw))  # the learned constant input (C, 4, 4)
        layers, size = [StyleLayer(ch, ch, w_dim, (bh, bw), up=False, conv=False, noise=noise)], (bh, bw)
        layers.append(StyleLayer(ch, ch, w_dim, size, up=False, conv=True, noise=noise))
        self.resolutions = [bh]
        for _ in range(k):  # (B, ch, h, w) -> (B, ch / 2, 2h, 2w), two style layers each
            size = (size[0] * 2, size[1] * 2)
            layers.append(StyleLayer(ch, ch // 2, w_dim, size, up=True, conv=True, noise=noise))
            layers.append(StyleLayer(ch // 2, ch // 2, w_dim, size, up=False, conv=True, noise=noise))
            ch //= 2
            self.resolutions.append(size[0])
        self.layers = nn.ModuleList(layers)
        self.to_image = EqualConv2d(ch, shape[0], 1, gain=1.0)

    def forward(self, ws):  # (B, num_ws, w_dim) -> (B, C, H, W) in [-1, 1]
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x, ws[:, i])
        return torch.tanh(self.to_image(x))


class StyleGenerator(nn.Module):
    def __init__(self, shape: tuple[int, ...], o: StyleGANOptions, name: str):
        super().__init__()
        self.out_shape, self.mixing_prob, self.w_avg_beta = tuple(shape), o.mixing_prob, o.w_avg_beta
        self.mapping = MappingNetwork(o.latent_dim, o.w_dim, o.mapping_layers)
        self.synthesis = Synthesis(shape, o.channels, o.w_dim, o.noise, name)
        self.num_ws = len(self.synthesis.layers)
        coarse = sum(r <= COARSE_MAX for r in self.synthesis.resolutions)  # resolutions up to 8x8 ...
        self.coarse_layers = 2 * min(max(coarse, 1), len(self.synthesis.resolutions) - 1)  # ... keeping one fine
        self.register_buffer("w_avg", torch.zeros(o.w_dim))  # running mean of w over training

    def broadcast(self, w):  # (B, w_dim) -> (B, num_ws, w_dim): the same style at every layer
        return w[:, None].expand(-1, self.num_ws, -1)

    def mix(self, w_coarse, w_fine, at: int | None = None):  # (B, w_dim) x 2 -> (B, num_ws, w_dim)
        at = self.coarse_layers if at is None else at  # layers [0, at) read w_coarse, [at, num_ws) w_fine
        layer = torch.arange(self.num_ws, device=w_coarse.device)[None, :, None]
        return torch.where(layer < at, w_coarse[:, None], w_fine[:, None])

    def truncate(self, w, psi):  # the truncation trick: w pulled towards the mean w by psi (1: off, 0: the mean)
        return self.w_avg + psi * (w - self.w_avg)

    def forward(self, z, psi: float | torch.Tensor = 1.0):  # (B, latent) -> (B, *out_shape) in [-1, 1]
        w = self.mapping(z)
        if not self.training:
            return self.synthesis(self.broadcast(self.truncate(w, psi)))
        with torch.no_grad():  # w_avg <- lerp towards this batch's mean w
            self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = self.broadcast(w)
        if self.mixing_prob > 0 and torch.rand(()) < self.mixing_prob:  # style mixing: one crossover per batch
            at = int(torch.randint(1, self.num_ws, ()))  # layers [at, num_ws) take a second z's w
            ws = self.mix(w, self.mapping(torch.randn_like(z)), at)
        return self.synthesis(ws)

    def param_groups(self, lr: float, mapping_lr_mult: float) -> list[dict]:
        # synthesis first: GanStep reports param_groups[0]'s lr as lr_g
        return [{"params": list(self.synthesis.parameters()), "lr": lr},
                {"params": list(self.mapping.parameters()), "lr": lr * mapping_lr_mult}]


# ---------------------------------------------------------------- the discriminator


class MinibatchStd(nn.Module):
    """Appends one channel: the standard deviation of each feature over groups of `group` examples, averaged
    (Karras et al. 2018). A batch of near-identical fakes shows up as a small value D can punish."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x):  # (B, C, H, W) -> (B, C + 1, H, W)
        b, c, h, w = x.shape
        g = math.gcd(self.group, b)  # groups of 4 where the batch allows (a batch of 6: of 2)
        y = x.reshape(g, -1, c, h, w)  # (G, B / G, C, H, W): example i in group i % (B / G)
        y = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (B / G,)
        return torch.cat([x, y.repeat(g)[:, None, None, None].expand(b, 1, h, w)], 1)


def style_discriminator(shape: tuple[int, ...], channels: int, mbstd: bool, name: str) -> Discriminator:
    # Conv 3x3 -> LeakyReLU -> k x [Conv 4x4 stride 2 -> LeakyReLU] -> [minibatch std ->] Conv 3x3 -> LeakyReLU
    # -> flatten -> Linear. No normalisation: R1 penalises per-example gradients.
    bh, bw, k = conv_plan(name, shape)
    ch = channels
    layers: list[nn.Module] = [EqualConv2d(shape[0], ch, 3, padding=1), nn.LeakyReLU(0.2)]
    for _ in range(k):
        layers += [EqualConv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch *= 2  # (B, ch, h, w) -> (B, 2 ch, h / 2, w / 2)
    if mbstd:
        layers.append(MinibatchStd())
    layers += [EqualConv2d(ch + mbstd, ch, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten()]  # (B, ch * bh * bw)
    return Discriminator(nn.Sequential(*layers), EqualLinear(ch * bh * bw, 1, gain=1.0))


class StyleGAN(GAN):
    """models.gan.GAN's interface (generator, discriminator, noise, sample, features; forward = D), plus the
    generator's optimizer groups (the mapping network at lr x mapping_lr_mult) and, unless ema_images is 0, the
    moving average of the generator's weights that samples are drawn from (`generator_ema`, in the checkpoint
    with the rest; `update_ema` after each generator step)."""

    def __init__(self, generator, discriminator, latent_dim, options, kind):
        super().__init__(generator, discriminator, latent_dim, options, kind)
        self.generator_ema = copy.deepcopy(generator).eval().requires_grad_(False) if options.ema_images else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.generator_ema is not None:
            self.generator_ema.eval()  # always the sampling network: fixed noise, no mixing, no w_avg update
        return self

    @torch.no_grad()
    def update_ema(self, images_seen: int, batch: int) -> None:
        o = self.options
        half_life = min(o.ema_images, o.ema_rampup * images_seen)
        beta = 0.5 ** (batch / max(half_life, 1e-8))
        for avg, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            avg.lerp_(p.detach(), 1.0 - beta)
        for avg, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            avg.copy_(b)  # w_avg, the fixed noise

    def generator_param_groups(self, lr: float) -> list[dict]:
        return self.generator.param_groups(lr, self.options.mapping_lr_mult)


# ---------------------------------------------------------------- registered variant


@register_model("stylegan", family="gan")
def stylegan(*, input_shape, num_classes, options: StyleGANOptions) -> nn.Module:
    if not is_image(input_shape):
        raise ValueError(f"stylegan: makes images (C, H, W); got shape {tuple(input_shape)} (use gan_mlp for points)")
    g = StyleGenerator(input_shape, options, "stylegan")
    d = style_discriminator(input_shape, options.channels, options.mbstd, "stylegan")
    return StyleGAN(g, d, options.latent_dim, options, "bce")
