"""Image-to-image GANs: `pix2pix` (Isola et al. 2017, paired) and `cyclegan` (Zhu et al. 2017, unpaired).

Both map an image of domain A to an image of domain B of the same shape (C, H, W), in [-1, 1] (the generators
end in tanh; the caller scales). `forward(a)` is the A -> B translation, so the registry's generic code can call
the model on data. The discriminators are PatchGANs: a grid of logits, one per overlapping patch of the input,
so they judge texture and local structure and leave the global layout to the L1 / cycle losses.

The training steps (D then G, the image pool, the losses) are in tasks/kinds/image2image.py; what varies between
runs is in their options (models/options.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.options import CycleGANOptions, Pix2PixOptions
from models.registry import register_model

# ---------------------------------------------------------------- pix2pix: U-Net generator


class NoiseDropout(nn.Dropout):
    """Dropout that stays on in eval mode: pix2pix's only source of noise, which the paper keeps at test time
    ("we apply dropout at test time", Isola et al. 2017, 3.1), so a translation is one draw of G(x, z)."""

    def forward(self, x):
        return F.dropout(x, self.p, training=True, inplace=self.inplace)


class UNetBlock(nn.Module):
    """One level of the U-Net: down -> (the inner levels) -> up, its input concatenated to its output."""

    def __init__(self, outer: int, inner: int, sub: nn.Module | None, outermost: bool = False, dropout: float = 0.0,
                 in_channels: int | None = None, test_dropout: bool = False):
        super().__init__()
        in_channels = in_channels or outer
        down = [nn.LeakyReLU(0.2, True)] if not outermost else []
        norm = not outermost and sub is not None  # none at the outermost and innermost levels (the paper's)
        down.append(nn.Conv2d(in_channels, inner, 4, 2, 1, bias=not norm))  # (B, outer, H, W) -> (B, inner, H/2, W/2)
        if norm:
            down.append(nn.BatchNorm2d(inner))
        up_in = inner if sub is None else 2 * inner  # the innermost level has no skip below it
        up: list[nn.Module] = [nn.ReLU(True)]
        if outermost:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1), nn.Tanh()]
        else:
            up += [nn.ConvTranspose2d(up_in, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
            if dropout:
                up.append(NoiseDropout(dropout) if test_dropout else nn.Dropout(dropout))
        self.down, self.sub, self.up, self.outermost = nn.Sequential(*down), sub, nn.Sequential(*up), outermost

    def forward(self, x):
        y = self.down(x)
        if self.sub is not None:
            y = self.sub(y)
        y = self.up(y)
        return y if self.outermost else torch.cat([x, y], 1)  # the skip: (B, 2 outer, H, W)


def unet(channels: int, width: int, depth: int, dropout: float, test_dropout: bool = False) -> nn.Module:
    # widths from the outside in: w, 2w, 4w, 8w, 8w, ... (the paper's, capped at 8w); dropout in the 3 innermost
    # decoder layers below the cap, as the paper's first three decoder layers
    widths = [width * min(2 ** i, 8) for i in range(depth)]  # output width of each down-convolution
    block = None
    for i in reversed(range(1, depth)):
        block = UNetBlock(widths[i - 1], widths[i], block, dropout=dropout if i >= depth - 3 and i > 1 else 0.0,
                          test_dropout=test_dropout)
    return UNetBlock(channels, widths[0], block, outermost=True, in_channels=channels)


# ---------------------------------------------------------------- cyclegan: ResNet generator


class ResidualBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


def resnet_generator(channels: int, width: int, blocks: int) -> nn.Module:
    # Johnson et al.'s network as CycleGAN uses it: c7s1-w, d2w, d4w, blocks x R4w, u2w, uw, c7s1-C, tanh
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, width, 7), nn.InstanceNorm2d(width),
                               nn.ReLU(True)]
    ch = width
    for _ in range(2):  # (B, ch, H, W) -> (B, 2 ch, H/2, W/2)
        layers += [nn.Conv2d(ch, 2 * ch, 3, 2, 1), nn.InstanceNorm2d(2 * ch), nn.ReLU(True)]
        ch *= 2
    layers += [ResidualBlock(ch) for _ in range(blocks)]
    for _ in range(2):  # back up
        layers += [nn.ConvTranspose2d(ch, ch // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(ch // 2),
                   nn.ReLU(True)]
        ch //= 2
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, channels, 7), nn.Tanh()]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- PatchGAN discriminator


def patch_discriminator(in_channels: int, width: int, layers: int, norm: type[nn.Module]) -> nn.Module:
    # C(w, no norm) s2 -> C(2w) s2 ... -> C s1 -> 1 channel s1: (B, in, H, W) -> (B, 1, h, w) patch logits.
    # 3 stride-2 layers make the paper's 70x70 patches; 2 make 16x16 ones, right for 32-pixel digits.
    net: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    ch = width
    for i in range(1, layers + 1):
        out, stride = width * min(2 ** i, 8), 2 if i < layers else 1
        net += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), norm(out), nn.LeakyReLU(0.2, True)]
        ch = out
    net.append(nn.Conv2d(ch, 1, 4, 1, 1))
    return nn.Sequential(*net)


class ProjectionDiscriminator(nn.Module):
    """A PatchGAN that also sees each image's class: every patch's logit plus the inner product of its features
    with the class's embedding (Miyato & Koyama 2018's projection discriminator). It judges "a real 7 of this
    domain", not only "an image of this domain", so a translation that keeps the source's class but not the
    target's way of drawing it is told apart."""

    def __init__(self, in_channels: int, width: int, layers: int, norm: type[nn.Module], classes: int):
        super().__init__()
        net = patch_discriminator(in_channels, width, layers, norm)
        self.features, self.logit = net[:-1], net[-1]
        self.embed = nn.Embedding(classes, self.logit.in_channels)

    def forward(self, x, y):  # (B, C, H, W), (B,) class indices -> (B, 1, h, w) patch logits
        h = self.features(x)
        agree = (h * self.embed(y)[:, :, None, None]).sum(1, keepdim=True)  # per position
        return self.logit(h) + F.avg_pool2d(agree, 4, 1, 1)  # over the logit's own 4x4 window


def gan_init(model: nn.Module) -> nn.Module:
    # both papers: conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):  # a projection discriminator's classes start as a small nudge
            nn.init.normal_(m.weight, 0.0, 0.02)
    return model


# ---------------------------------------------------------------- the registered models


class Pix2Pix(nn.Module):
    kind = "paired"

    def __init__(self, shape: tuple[int, int, int], options: Pix2PixOptions):
        super().__init__()
        self.options, self.shape = options, shape
        self.generator = unet(shape[0], options.channels, options.depth, options.dropout, options.test_dropout)
        # conditional: D sees the input beside the real or generated output, (B, 2C, H, W)
        self.discriminator = patch_discriminator(2 * shape[0], options.d_channels, options.d_layers, nn.BatchNorm2d)

    def forward(self, a):  # (B, C, H, W) in [-1, 1] -> the same, in domain B
        return self.generator(a)

    def generators(self) -> list[nn.Module]:
        return [self.generator]

    def discriminators(self) -> list[nn.Module]:
        return [self.discriminator] if self.options.adversarial else []


class CycleGAN(nn.Module):
    kind = "cycle"

    def __init__(self, shape: tuple[int, int, int], options: CycleGANOptions, classes: int):
        super().__init__()
        self.options, self.shape = options, shape
        c, o = shape[0], options
        self.g_ab = resnet_generator(c, o.channels, o.blocks)  # G: A -> B
        self.g_ba = resnet_generator(c, o.channels, o.blocks)  # F: B -> A
        if o.conditional:  # each discriminator also told the image's class (a translation: its source's)
            self.d_a = ProjectionDiscriminator(c, o.d_channels, o.d_layers, nn.InstanceNorm2d, classes)
            self.d_b = ProjectionDiscriminator(c, o.d_channels, o.d_layers, nn.InstanceNorm2d, classes)
        else:
            self.d_a = patch_discriminator(c, o.d_channels, o.d_layers, nn.InstanceNorm2d)  # real A vs F(b)
            self.d_b = patch_discriminator(c, o.d_channels, o.d_layers, nn.InstanceNorm2d)  # real B vs G(a)

    def forward(self, a):  # (B, C, H, W) in [-1, 1] -> domain B
        return self.g_ab(a)

    def generators(self) -> list[nn.Module]:
        return [self.g_ab, self.g_ba]

    def discriminators(self) -> list[nn.Module]:
        return [self.d_a, self.d_b]


def _image(name: str, shape, halvings: int) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"{name} translates images (C, H, W); got shape {tuple(shape)}")
    c, h, w = shape
    step = 2 ** halvings
    if h % step or w % step:
        raise ValueError(f"{name}: image sides {h}x{w} must be multiples of {step} ({halvings} halvings); "
                         "prepare the images at 32x32 (the paired and unpaired sources do)")
    return c, h, w


@register_model("pix2pix", family="gan")
def pix2pix(*, input_shape, num_classes, options: Pix2PixOptions) -> nn.Module:
    shape = _image("pix2pix", input_shape, options.depth)
    if min(shape[1:]) < 2 ** options.d_layers * 4:
        raise ValueError(f"pix2pix: d_layers {options.d_layers} is too deep for {shape[1]}x{shape[2]} images")
    return gan_init(Pix2Pix(shape, options))


@register_model("cyclegan", family="gan")
def cyclegan(*, input_shape, num_classes, options: CycleGANOptions) -> nn.Module:
    shape = _image("cyclegan", input_shape, 2)
    if min(shape[1:]) < 2 ** options.d_layers * 4:
        raise ValueError(f"cyclegan: d_layers {options.d_layers} is too deep for {shape[1]}x{shape[2]} images")
    if options.conditional and not num_classes:
        raise ValueError("cyclegan: conditional needs both domains' labels (the unpaired source has them)")
    return gan_init(CycleGAN(shape, options, num_classes or 0))


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- what CycleGAN's step uses beside its networks


class ImagePool:
    """Shrivastava et al.'s history of generated images: the discriminator sees, half the time, a fake from
    earlier steps instead of the newest, which damps the oscillation between G and D (CycleGAN, pool of 50)."""

    def __init__(self, size: int, seed: int):
        self.size, self.images, self.labels = size, [], []
        self.rng = torch.Generator().manual_seed(seed)

    def query(self, fakes: torch.Tensor, labels: torch.Tensor | None = None):
        """(B, C, H, W) -> (B, C, H, W), detached; with each fake's class (B,) -> (images, their classes)."""
        fakes = fakes.detach()
        classes = torch.zeros(len(fakes), dtype=torch.long, device=fakes.device) if labels is None else labels
        if self.size == 0:
            return fakes if labels is None else (fakes, labels)
        out, out_labels = [], []
        for img, y in zip(fakes, classes):
            if len(self.images) < self.size:
                self.images.append(img.clone())
                self.labels.append(y.clone())
                out.append(img)
                out_labels.append(y)
            elif torch.rand((), generator=self.rng) < 0.5:
                k = int(torch.randint(len(self.images), (), generator=self.rng))
                out.append(self.images[k].clone())
                out_labels.append(self.labels[k].clone())
                self.images[k], self.labels[k] = img.clone(), y.clone()
            else:
                out.append(img)
                out_labels.append(y)
        return torch.stack(out) if labels is None else (torch.stack(out), torch.stack(out_labels))

    def state_dict(self) -> dict:
        return {"images": torch.stack(self.images) if self.images else None,
                "labels": torch.stack(self.labels) if self.labels else None, "rng": self.rng.get_state()}

    def load_state_dict(self, s: dict, device) -> None:
        self.images = [] if s["images"] is None else [img.to(device) for img in s["images"]]
        labels = s.get("labels")  # a checkpoint from before the pool kept classes: all class 0, never read
        self.labels = ([y.to(device) for y in labels] if labels is not None
                       else [torch.zeros((), dtype=torch.long, device=device) for _ in self.images])
        self.rng.set_state(s["rng"])


class SourceClassifier(nn.Module):
    """A frozen classifier of domain A's images (trained on its labelled training split: domain_judge), reading
    the step's images ([-1, 1] by the run's scaling) in its own input units."""

    def __init__(self, clf: nn.Module, run_mean, run_std, clf_mean, clf_std):
        super().__init__()
        self.clf = clf.eval()
        for p in self.clf.parameters():
            p.requires_grad_(False)
        view = (1, -1, 1, 1)
        t = lambda v: torch.as_tensor(v, dtype=torch.float32).view(view)  # noqa: E731
        # x (run units) -> raw -> the classifier's units: one affine map per channel
        self.register_buffer("scale", t(run_std) / t(clf_std))
        self.register_buffer("shift", (t(run_mean) - t(clf_mean)) / t(clf_std))

    def forward(self, x):  # (B, C, H, W) -> logits (B, K)
        return self.clf(x * self.scale + self.shift)
