"""Transfer learning offline: a CNN pretrained on digits 0-4 and registered in MLflow, reused frozen for 5-9."""
import uuid

import pytest
import torch

from models.registry import create_model
from tasks.config import TrainConfig, validate
from tasks.train import Split, Trainer, seed_everything
from tasks.kinds.supervised import SupervisedStep

BASE = {"depth": 8}


def test_frozen_base_and_fine_tune_phase_with_its_own_learning_rate():
    seed_everything(0)
    model = create_model("transfer", input_shape=(1, 8, 8), num_classes=5, base_arch="simple_cnn",
                         fine_tune_blocks=1, fine_tune_after=1, fine_tune_lr=0.1)
    blocks = list(model.features.children())
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    cfg = TrainConfig(epochs=2, lr=1e-2, device="cpu", diagnostics={"enabled": False})
    t = Trainer(model, cfg, 0, torch.device("cpu"), SupervisedStep(model, cfg, torch.device("cpu")))
    assert [g["lr"] for g in t.step.opt.param_groups] == [1e-2, pytest.approx(1e-3)]
    data = Split(torch.randn(128, 1, 8, 8), torch.randint(0, 5, (128,)))
    t.fit(data, data)
    changed = [any(not torch.equal(v, b.state_dict()[k]) for k, v in s.items()) for s, b in zip(before, blocks)]
    assert changed == [False] * (len(blocks) - 1) + [True]  # only the fine-tuned last block learned
    assert not any(p.requires_grad for b in blocks[:-1] for p in b.parameters())


def test_torchvision_base_without_cached_weights_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        create_model("transfer", input_shape=(3, 32, 32), num_classes=10, base="torchvision:resnet18")
    msg = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "download=true" in msg and "TORCH_HOME" in msg


def test_bad_base_reference_is_named():
    with pytest.raises(ValueError, match="not a model reference"):
        create_model("transfer", input_shape=(1, 8, 8), num_classes=5, base="my-model")


@pytest.mark.slow
def test_transfer_from_a_registered_model_beats_training_from_scratch(tmp_path, monkeypatch):
    """MNIST digits 0-4 -> 5-9 with 30 training images. Measured (seeds 0, 1): frozen pretrained base 0.57-0.63
    test accuracy, the same network from scratch 0.45-0.48, a frozen random base 0.24-0.27."""
    from tasks.data import prepare
    from tasks.stages import evaluate_stage, train_stage
    from tasks.registration import register_version

    monkeypatch.chdir(tmp_path)
    name = f"mnist04-{uuid.uuid4().hex[:6]}"
    # 1. pretrain on digits 0-4, register it
    pre = validate({"data": {"source": "mnist5k", "classes": [0, 1, 2, 3, 4]},
                    "train": {"epochs": 4, "device": "cpu"}, "models": {"pre": {"arch": "resnet", **BASE}}})
    prepare(pre.data, 0, "d04")
    trained = train_stage(pre, "pre", "d04", "out/pre")
    assert evaluate_stage(pre, "pre", "d04", "out/pre", "m/pre.json", "p/pre")["test_accuracy"] > 0.9
    register_version(name, trained.model_uri, 1.0, 0.0, {})

    # 2. digits 5-9, 30 training images: the frozen base under a new head vs the same network from scratch
    models = {"transfer": {"base": f"models:/{name}@champion", "train": {"lr": 0.01}},
              "scratch": {"arch": "transfer", "base_arch": "resnet", "base_options": BASE, "trainable": True}}
    cfg = validate({"data": {"source": "mnist5k", "classes": [5, 6, 7, 8, 9], "max_train": 30},
                    "train": {"epochs": 40, "device": "cpu"}, "models": models})
    prepare(cfg.data, 0, "d59")
    acc = {}
    for run in models:
        train_stage(cfg, run, "d59", f"out/{run}")
        acc[run] = evaluate_stage(cfg, run, "d59", f"out/{run}", f"m/{run}.json", f"p/{run}")["test_accuracy"]
    assert acc["transfer"] > acc["scratch"] + 0.05, acc

    # frozen means frozen: every base tensor bit-identical to the registered model's, and the base pinned
    final = torch.load("out/transfer/model.pt", weights_only=False)
    assert final["options"]["base"] == f"models:/{name}/1"
    pre_final = torch.load("out/pre/model.pt", weights_only=False)
    base = {k: v for k, v in pre_final["model"].items() if k.startswith("features.")}
    assert base and all(torch.equal(final["model"][k], v) for k, v in base.items())
