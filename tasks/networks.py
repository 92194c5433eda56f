"""A network from its name and data, and again from a run's self-describing checkpoint (weights and plain data
only): what training builds, and what evaluation, serving, the GAN judge and transfer learning rebuild."""
from __future__ import annotations

from pathlib import Path

import torch

from models.registry import create_model, get_spec, list_models
from tasks.files import load_torch


def build(arch: str, options: dict, manifest: dict) -> torch.nn.Module:
    """create_model for the data `manifest` describes: token data hands its vocabulary size to the embedding;
    a base named by a tracking reference (transfer learning) is fetched here and handed over loaded."""
    spec = get_spec(arch)
    if manifest.get("vocab_size"):
        if "vocab_size" not in spec.options.model_fields:
            takes = [n for n in list_models() if "vocab_size" in get_spec(n).options.model_fields]
            raise ValueError(f"model {arch!r} does not read token ids ({manifest.get('source', 'the data')} is text); "
                             f"models that do: {', '.join(takes)}")
        options = {**options, "vocab_size": manifest["vocab_size"]}
    base = options.get("base")
    if "base_checkpoint" in spec.options.model_fields and base and not base.startswith("torchvision:"):
        from tasks.registration import load_checkpoint

        checkpoint, uri = load_checkpoint(base)
        options = {**options, "base": uri, "base_checkpoint": checkpoint}
    return create_model(arch, input_shape=tuple(manifest["input_shape"]), num_classes=manifest["num_classes"], **options)


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained network from its self-describing `model.pt` (weights and plain data only)."""
    final = load_torch(path, map_location=device)
    return rebuild(final, device), final


def rebuild(final: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    model = build(final["arch"], final["options"], final)
    model.load_state_dict(final["model"])
    return model.to(device).eval()
