"""What a network costs and sees: multiply-accumulates per example and the receptive field of its last
convolutional feature map. Measured on the module itself (hooks, a gradient probe), so it holds for any
architecture in the registry, branches and shortcuts included.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

MAX_PROBE = 512  # largest probe input side for receptive_field; a field wider than ~this is a lower bound
_ACTIVATIONS = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish,
                nn.PReLU, nn.Softplus, nn.Tanh, nn.Sigmoid)  # Hardtanh covers ReLU6


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one example: convolutions (grouped and depthwise
    too), linear layers, recurrent cells (RNN/LSTM/GRU) and multi-head attention; biases, normalisation,
    activations, gate nonlinearities and pooling are not counted."""
    total = 0

    def conv(m: _ConvNd, inp, out):
        nonlocal total
        k = math.prod(m.kernel_size)
        if m.transposed:  # every input element is spread over out_channels/groups kernels
            total += inp[0].numel() * (m.out_channels // m.groups) * k
        else:  # every output element sums in_channels/groups kernels
            total += out.numel() * (m.in_channels // m.groups) * k

    def linear(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    def recurrent(m: nn.RNNBase, inp, out):  # per step, layer and direction: gates x (input + hidden) x hidden
        nonlocal total
        x = inp[0]
        steps = int(x.batch_sizes.sum()) if isinstance(x, nn.utils.rnn.PackedSequence) else x.shape[1] * x.shape[0]
        gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
        directions = 2 if m.bidirectional else 1
        for layer in range(m.num_layers):
            width = m.input_size if layer == 0 else m.hidden_size * directions
            total += steps * directions * gates * (width + m.hidden_size) * m.hidden_size

    def attention(m: nn.MultiheadAttention, inp, out):  # q/k/v and output projections, scores, weighted sum
        nonlocal total  # (the functional path uses out_proj's weight without calling it as a module)
        q, k = inp[0], inp[1]  # batch_first (B, T, E) as in models/sequence.py
        b, tq, tk, e = q.shape[0], q.shape[1], k.shape[1], m.embed_dim
        total += b * (2 * tq + 2 * tk) * e * e + 2 * b * tq * tk * e

    handles = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, _ConvNd)]
    handles += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_hook(recurrent) for m in model.modules() if isinstance(m, nn.RNNBase)]
    handles += [m.register_forward_hook(attention) for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    param = next(model.parameters(), None)
    dtype = torch.long if getattr(getattr(model, "adapter", None), "tokens", False) else None  # token ids
    x = torch.ones(1, *input_shape, device=param.device if param is not None else "cpu", dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # with grad off, eval-mode transformer layers take a fused path past the hooks
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def receptive_field(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """Side of the receptive field (see receptive_field_bound), probed up to MAX_PROBE."""
    return receptive_field_bound(model, input_shape)[0]


def receptive_field_bound(model: nn.Module, input_shape: tuple[int, ...],
                          max_probe: int = MAX_PROBE) -> tuple[int | None, bool]:
    """Side, in input pixels, of the receptive field of one unit of the last convolutional feature map:
    the output of `model.features` where the model has one (for Inception, the concatenated branches of
    its last block), else of the last convolution to run. None when the model has no convolution. Returned
    with whether it is only a lower bound: the field still touched the border of the largest probe.

    Gradient method: on a copy made linear and positive (conv kernels constant 1/fan_in, BN and
    activations removed, max pooling -> average pooling, so nothing cancels or routes to one argmax),
    back-propagate from the centre unit and measure the extent of the non-zero input gradient. Branches
    and shortcuts count as they run. The probe input grows (doubling, up to MAX_PROBE) until the field
    no longer touches its border, so fields wider than the input itself are measured too."""
    if not any(isinstance(m, _ConvNd) for m in model.modules()):
        return None, False
    probe = _linear_positive_copy(model)
    target = _last_feature_module(probe, input_shape)
    size = max(input_shape[1:])
    while True:
        extent, clipped = _gradient_extent(probe, target, input_shape[0], size)
        if not clipped or size >= max_probe:
            return extent, clipped
        size = min(2 * size, max_probe)


def _linear_positive_copy(model: nn.Module) -> nn.Module:
    probe = copy.deepcopy(model).double().eval().requires_grad_(False)
    with torch.no_grad():
        for name, m in list(probe.named_modules()):
            if isinstance(m, _ConvNd):
                fan_in = (m.in_channels // m.groups) * math.prod(m.kernel_size)
                m.weight.fill_(1.0 / fan_in)  # an average: values stay ~1 however deep (float64 for the tails)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (_BatchNorm, *_ACTIVATIONS)):
                _replace(probe, name, nn.Identity())
            elif isinstance(m, nn.MaxPool2d):
                _replace(probe, name, nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode))
            elif isinstance(m, nn.AdaptiveMaxPool2d):
                _replace(probe, name, nn.AdaptiveAvgPool2d(m.output_size))
    return probe


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


def _last_feature_module(probe: nn.Module, input_shape) -> nn.Module:
    features = getattr(probe, "features", None)
    if isinstance(features, nn.Module) and any(isinstance(m, _ConvNd) for m in features.modules()):
        return features
    ran: list[nn.Module] = []  # convolutions in the order they run
    handles = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in probe.modules() if isinstance(m, _ConvNd)]
    try:
        probe(torch.ones(1, *input_shape, dtype=torch.float64))
    finally:
        for h in handles:
            h.remove()
    return ran[-1]


class _Stop(Exception):
    pass


def _gradient_extent(probe: nn.Module, target: nn.Module, channels: int, size: int) -> tuple[int, bool]:
    """(extent of the centre unit's field, whether it touches the probe input's border)."""
    x = torch.ones(1, channels, size, size, dtype=torch.float64, requires_grad=True)
    got = []

    def stop(_m, _i, out):  # the head after the feature map may not take a larger input: skip it
        got.append(out)
        raise _Stop

    handle = target.register_forward_hook(stop)
    try:
        probe(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = got[0]  # (1, C, h, w)
    h, w = out.shape[-2:]
    out[0, :, h // 2, w // 2].sum().backward()
    seen = x.grad[0].abs().sum(0) > 0  # (size, size)
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    extent = max(int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1)
    clipped = bool(rows[0] == 0 or cols[0] == 0 or rows[-1] == size - 1 or cols[-1] == size - 1)
    return extent, clipped


def format_count(n: float) -> str:
    """1234 -> 1.2k, 3_400_000 -> 3.4M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
