"""Weight initialisation schemes for `train.init` (the initializers users compare): every Linear, convolution,
recurrent and attention weight re-drawn by the scheme, biases zero; layers whose initialisation is part of their
method keep it."""
from __future__ import annotations

import torch
from torch import nn


def init_weights(model: nn.Module, scheme: str) -> int:
    """Re-initialise weight matrices and kernels of Linear/Conv/RNN/attention layers; biases to zero. Layers
    whose initialisation is part of their method (`own_init`: StyleGAN's equalised-lr layers) keep it; returns
    how many did."""
    if scheme == "default":
        return 0
    fill = {
        "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),  # std = sqrt(2 / fan_in)
        "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
        "xavier_normal": nn.init.xavier_normal_,  # std = sqrt(2 / (fan_in + fan_out))
        "xavier_uniform": nn.init.xavier_uniform_,
        "orthogonal": nn.init.orthogonal_,
    }[scheme]
    kept = 0
    for m in model.modules():
        if getattr(m, "own_init", False):
            kept += 1
            continue
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            fill(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RNNBase):
            _init_recurrent(m, fill)
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            # Transformer attention: the packed query/key/value projection, one (E, E) block each (the output
            # projection is an nn.Linear, handled above).
            with torch.no_grad():
                for block in m.in_proj_weight.chunk(3):
                    fill(block)
            if m.in_proj_bias is not None:
                nn.init.zeros_(m.in_proj_bias)
    return kept


def _init_recurrent(m: nn.RNNBase, fill) -> None:
    """RNN/LSTM/GRU: each gate's block of a stacked matrix on its own, so fans are the gate's (H, in) and not
    (gates * H, in). Input-to-hidden: the scheme; hidden-to-hidden: orthogonal whatever the scheme (its singular
    values 1 keep the state's norm over many steps: Saxe et al. 2014); biases zero, except the LSTM forget gate's
    at 1 so the cell remembers from the start (Jozefowicz et al. 2015; Keras's unit_forget_bias). PyTorch adds
    bias_ih and bias_hh: the 1 goes in bias_ih."""
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("weight_ih"):
                for block in p.chunk(gates):
                    fill(block)
            elif name.startswith("weight_hh"):
                for block in p.chunk(gates):
                    nn.init.orthogonal_(block)
            elif name.startswith("weight_hr"):  # LSTM projection (proj_size > 0)
                fill(p)
            elif name.startswith("bias"):
                nn.init.zeros_(p)
                if m.mode == "LSTM" and name.startswith("bias_ih"):
                    p.chunk(4)[1].fill_(1.0)  # gate order: input, forget, cell, output
