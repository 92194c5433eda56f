"""Gradient-health diagnostics: the rules fire where the textbook says they should, and only there."""
import pytest
import torch
from sklearn.datasets import load_digits

from models.registry import create_model
from tasks.config import TrainConfig
from tasks.diagnostics import dead_fraction
from tasks.initialization import init_weights
from tasks.train import NonFiniteLoss, Split, Trainer, seed_everything
from tasks.kinds.supervised import SupervisedStep


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0 - 0.5, dtype=torch.float32).view(-1, 1, 8, 8)
    return Split(x[:1000], torch.tensor(y[:1000])), Split(x[1000:1300], torch.tensor(y[1000:1300]))


def deep(activation, init, scale=1.0, **train):
    seed_everything(0)
    model = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[64] * 8, activation=activation,
                         dropout=0.0)
    cfg = TrainConfig(epochs=2, device="cpu", diagnostics={"every": 5}, **train)
    init_weights(model, init)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return Trainer(model, cfg, 0, torch.device("cpu"), SupervisedStep(model, cfg, torch.device("cpu")))


def test_deep_sigmoid_with_tiny_weights_is_flagged_vanishing(digits):
    t = deep("sigmoid", "xavier_normal", scale=0.1, optimizer="sgd", lr=0.1)
    t.fit(*digits)
    h = t.diagnostics.health()
    assert h["vanishing"] and not h["exploding"]
    assert t.diagnostics.summary()["health/median_grad_ratio_first_last"] < 1e-3


def test_same_depth_relu_he_is_healthy(digits):
    t = deep("relu", "he_normal", optimizer="sgd", lr=0.05)
    t.fit(*digits)
    assert t.diagnostics.health() == {"vanishing": False, "exploding": False, "dead_units": False}
    assert 0.05 < t.diagnostics.summary()["health/median_grad_ratio_first_last"] < 20


def test_huge_learning_rate_is_flagged_exploding_and_stopped(digits):
    t = deep("relu", "he_normal", optimizer="sgd", lr=10.0)
    with pytest.raises(NonFiniteLoss):
        t.fit(*digits)
    assert t.diagnostics.health()["exploding"]


def test_records_are_every_n_steps_and_complete(digits):
    t = deep("relu", "he_normal")
    t.fit(*digits)
    recs = t.diagnostics.drain()
    steps_per_epoch = -(-1000 // 64)
    assert [s for s, _ in recs] == list(range(5, 2 * steps_per_epoch + 1, 5))
    first = recs[0][1]
    assert {"health/grad_norm", "health/grad_ratio_first_last", "health/update_ratio", "health/dead_units"} <= set(first)
    assert sum(k.startswith("layers/grad_norm.") for k in first) == 9  # 8 hidden + output weight matrices
    assert 0 < first["health/update_ratio"] < 1


def test_dead_units_counted_on_the_probe():
    model = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[10], dropout=0.0)
    with torch.no_grad():
        model.net[1].weight.zero_()
        model.net[1].bias.copy_(torch.tensor([1.0] * 3 + [-1.0] * 7))  # 7 of 10 units can never fire
    assert dead_fraction(model, torch.randn(32, 1, 8, 8)) == pytest.approx(0.7)
