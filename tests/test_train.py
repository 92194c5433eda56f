import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from models.registry import create_model
from tasks.config import TrainConfig
from tasks.initialization import init_weights
from tasks.train import NonFiniteLoss, Split, Trainer, seed_everything
from tasks.kinds.supervised import SupervisedStep

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0 - 0.5, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    return Split(x[:1200], y[:1200]), Split(x[1200:1500], y[1200:1500])


def trainer(arch="mlp", seed=0, options=None, **train):
    seed_everything(seed)
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 64, "device": "cpu", **train})
    model = create_model(arch, input_shape=(1, 8, 8), num_classes=10, **(options or {"dropout": 0.0}))
    init_weights(model, cfg.init)
    return Trainer(model, cfg, seed, CPU, SupervisedStep(model, cfg, CPU))


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() > 1])


# ---------------------------------------------------------------- optimizers

@pytest.mark.parametrize("opt, lr", [("sgd", 0.5), ("momentum", 0.05), ("adagrad", 0.05), ("rmsprop", 1e-3),
                                     ("adam", 1e-3), ("adamw", 1e-3)])
def test_each_optimizer_learns(digits, opt, lr):
    t = trainer(optimizer=opt, lr=lr, epochs=5)
    before = t.evaluate(digits[1])["val_loss"]
    res = t.fit(*digits)
    assert res.history[-1]["val_loss"] < 0.3 * before
    assert res.history[-1]["val_accuracy"] > 0.85
    assert type(t.step.opt).__name__ == {"sgd": "SGD", "momentum": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop",
                                    "adam": "Adam", "adamw": "AdamW"}[opt]


def test_momentum_and_nesterov_change_the_trajectory(digits):
    losses = {}
    for name, kw in {"sgd": {"optimizer": "sgd"}, "momentum": {"optimizer": "momentum"},
                     "nesterov": {"optimizer": "momentum", "nesterov": True}}.items():
        losses[name] = trainer(lr=0.01, epochs=2, **kw).fit(*digits).history[-1]["train_loss"]
    assert losses["momentum"] < losses["sgd"]  # momentum accelerates a small lr
    assert losses["nesterov"] != losses["momentum"]


def test_adamw_decoupled_weight_decay_shrinks_weights(digits):
    adam = weights(_fit(digits, optimizer="adam"))
    adamw = weights(_fit(digits, optimizer="adamw", weight_decay=5.0))
    assert adamw.norm() < 0.9 * adam.norm()


# ---------------------------------------------------------------- initializers

def test_he_normal_std_matches_fan_in():
    torch.manual_seed(0)
    m = create_model("mlp", input_shape=(1, 32, 32), num_classes=10, hidden=[512])
    init_weights(m, "he_normal")
    w = m.net[1].weight  # (512, 1024)
    assert abs(w.std().item() - math.sqrt(2 / 1024)) < 0.02 * math.sqrt(2 / 1024) * 5
    assert m.net[1].bias.abs().sum() == 0


def test_xavier_and_orthogonal():
    torch.manual_seed(0)
    m = create_model("mlp", input_shape=(1, 16, 16), num_classes=10, hidden=[256])
    init_weights(m, "xavier_normal")
    w = m.net[1].weight  # (256, 256)
    assert abs(w.std().item() - math.sqrt(2 / (256 + 256))) < 0.05 * math.sqrt(2 / 512)
    init_weights(m, "xavier_uniform")
    bound = math.sqrt(6 / 512)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    init_weights(m, "orthogonal")
    assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-4)


def test_conv_kernels_get_he_init_too():
    torch.manual_seed(0)
    m = create_model("simple_cnn", input_shape=(1, 28, 28), num_classes=10)
    init_weights(m, "he_uniform")
    conv = next(l for l in m.modules() if isinstance(l, torch.nn.Conv2d) and l.in_channels == 64)
    fan_in = 64 * 3 * 3
    assert abs(conv.weight.std().item() - math.sqrt(2 / fan_in)) < 0.1 * math.sqrt(2 / fan_in)


# ---------------------------------------------------------------- regularizers

def test_l1_drives_weights_toward_zero(digits):
    plain = weights(_fit(digits, l1=0.0))
    sparse = weights(_fit(digits, l1=1e-3))
    assert sparse.abs().mean() < 0.5 * plain.abs().mean()
    assert (sparse.abs() < 1e-3).float().mean() > 2 * (plain.abs() < 1e-3).float().mean()


def test_l2_shrinks_the_weight_norm(digits):
    assert weights(_fit(digits, l2=1e-2)).norm() < 0.7 * weights(_fit(digits, l2=0.0)).norm()


def _fit(digits, **train):
    t = trainer(epochs=5, **train)
    t.fit(*digits)
    return t.model


def test_dropout_makes_training_stochastic_and_eval_deterministic(digits):
    t = trainer(options={"dropout": 0.5})
    x = digits[0].x[:8]
    t.model.train()
    assert not torch.equal(t.model(x), t.model(x))
    t.model.eval()
    assert torch.equal(t.model(x), t.model(x))


def test_batch_norm_tracks_statistics(digits):
    t = trainer(options={"batch_norm": True, "dropout": 0.0}, epochs=1)
    bn = t.model.net[2]
    assert isinstance(bn, torch.nn.BatchNorm1d)
    t.fit(*digits)
    assert bn.num_batches_tracked > 0 and not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_early_stopping_halts_on_plateau_and_restores_best(digits):
    # lr so high the validation loss gets worse after the first epochs: a plateau/rise to stop on
    t = trainer(optimizer="sgd", lr=1.5, epochs=40, early_stopping={"enabled": True, "patience": 3})
    snapshots = {}
    res = t.fit(*digits, on_epoch=lambda e, m, tr: snapshots.__setitem__(e, {k: v.clone() for k, v in tr.model.state_dict().items()}))
    assert res.stopped_early and res.epochs < 40
    assert res.epochs == res.best_epoch + 3
    best = min(range(len(res.history)), key=lambda i: res.history[i]["val_loss"]) + 1
    assert res.best_epoch == best
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snapshots[best][k])


def test_early_stopping_min_delta_and_accuracy_monitor(digits):
    t = trainer(epochs=30, early_stopping={"enabled": True, "patience": 2, "min_delta": 0.5, "monitor": "val_accuracy"})
    res = t.fit(*digits)
    assert res.stopped_early and res.epochs <= 4  # no epoch can improve accuracy by 0.5 after the first


def test_gradient_clipping_bounds_each_step(digits):
    t = trainer(optimizer="sgd", lr=1.0, epochs=1, batch_size=1200, grad_clip=0.01)
    before = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
    t.fit(*digits)
    after = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    assert (after - before).norm() <= 1.0 * 0.01 + 1e-6  # one step: ||lr * clipped grad|| <= lr * max_norm
    t2 = trainer(optimizer="sgd", lr=1.0, epochs=1, batch_size=1200)
    b2 = torch.cat([p.detach().flatten().clone() for p in t2.model.parameters()])
    t2.fit(*digits)
    assert (torch.cat([p.detach().flatten() for p in t2.model.parameters()]) - b2).norm() > 0.05


@pytest.mark.parametrize("schedule, expect", [("step", [1e-2, 1e-2, 1e-3, 1e-3]), ("cosine", None)])
def test_schedules(digits, schedule, expect):
    t = trainer(lr=1e-2, optimizer="sgd", epochs=4, schedule=schedule, step_size=2, gamma=0.1)
    lrs = [h["lr"] for h in t.fit(*digits).history]
    if expect:
        assert np.allclose(lrs, expect)
    else:
        assert lrs[0] == 1e-2 and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_warmup_rises_linearly_then_decays_as_one_over_the_root_of_the_step(digits):
    # 1200 examples in batches of 400: 3 optimizer steps an epoch; the lr logged is the coming step's
    t = trainer(lr=1e-2, optimizer="sgd", epochs=8, batch_size=400, schedule="warmup", warmup_steps=10)
    assert t.step.opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # the first step's: 1/10 of the way up
    lrs = [h["lr"] for h in t.fit(*digits).history]
    expect = [1e-2 * min(s / 10, math.sqrt(10 / s)) for s in range(4, 26, 3)]
    assert np.allclose(lrs, expect) and max(lrs) == pytest.approx(1e-2)  # step 10: the peak, train.lr


def test_selection_on_a_score_the_kind_adds_keeps_its_best_epoch_and_survives_a_resume(digits):
    """A kind's on_epoch adds its score (translation: val_bleu, higher wins); the stopper judges the epoch on
    it, after the checkpoint was written, so a resumed run judges the checkpointed epoch again."""
    bleu = {1: 5.0, 2: 9.0, 3: 7.0, 4: 8.0, 5: 1.0}
    kw = dict(epochs=5, early_stopping={"enabled": True, "monitor": "val_bleu", "patience": 2})
    snapshots, states = {}, []

    def measure(e, m, tr):
        m["val_bleu"] = bleu[e]
        snapshots[e] = {k: v.clone() for k, v in tr.model.state_dict().items()}
        states.append(tr.state_dict())

    res = trainer(**kw).fit(*digits, on_epoch=measure)
    assert res.stopped_early and (res.epochs, res.best_epoch) == (4, 2)
    resumed = trainer(**kw)
    resumed.load_state_dict(states[3])  # killed after epoch 4's checkpoint, before it was judged
    again = resumed.fit(*digits, on_epoch=measure)
    assert again.stopped_early and (again.epochs, again.best_epoch) == (4, 2)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])
    with pytest.raises(ValueError, match="does not measure val_bleu; it measures val_accuracy, val_loss"):
        trainer(**kw).fit(*digits)


# ---------------------------------------------------------------- failure, determinism, resume

def test_non_finite_loss_names_epoch_and_step(digits):
    x = digits[0].x.clone()
    x[100] = float("nan")  # one poisoned example: the step that draws it goes non-finite
    t = trainer(epochs=2, batch_size=1200)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 1"):
        t.fit(Split(x, digits[0].y), digits[1])


def test_same_seed_same_metrics(digits):
    a = trainer(seed=3, options={"dropout": 0.3}).fit(*digits).history
    b = trainer(seed=3, options={"dropout": 0.3}).fit(*digits).history
    c = trainer(seed=4, options={"dropout": 0.3}).fit(*digits).history
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(a) == strip(b) and strip(a) != strip(c)


@pytest.mark.parametrize("schedule", [dict(schedule="step", step_size=1, gamma=0.5),
                                      dict(schedule="warmup", warmup_steps=30, batch_size=100)])
def test_checkpoint_resume_is_bit_identical(digits, schedule):
    kw = dict(seed=1, options={"dropout": 0.3}, epochs=4, **schedule)
    straight = trainer(**kw)
    straight.fit(*digits)
    first = trainer(**{**kw, "epochs": 4})
    states = []
    first.cfg.epochs = 2
    first.fit(*digits, on_epoch=lambda e, m, tr: states.append(tr.state_dict()))
    torch.manual_seed(123)  # a fresh process would have a different RNG: the checkpoint must restore it
    resumed = trainer(**kw)
    resumed.load_state_dict(states[-1])
    resumed.fit(*digits)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)


def test_bf16_advice_follows_the_cpus_capability(monkeypatch, capsys):
    """`precision: auto` stays fp32 on a CPU; asking for bf16 on one without native bfloat16 warns once."""
    from tasks import train as tr

    assert tr.cpu_bf16_native("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n") is True
    assert tr.cpu_bf16_native("flags\t\t: fpu sse2 avx2 fma\n") is False
    assert tr.cpu_bf16_native("Features\t: fp asimd sve bf16\n") is True
    assert tr.cpu_bf16_native("no flags here\n") is None
    cpu = torch.device("cpu")
    monkeypatch.setattr(tr, "_BF16_WARNED", [])
    monkeypatch.setattr(tr, "cpu_bf16_native", lambda: False)
    assert tr.use_bf16("auto", cpu) is False and capsys.readouterr().err == ""
    assert tr.use_bf16("bf16", cpu) is True and tr.use_bf16("bf16", cpu) is True
    assert capsys.readouterr().err.count("without native bfloat16") == 1
    monkeypatch.setattr(tr, "_BF16_WARNED", [])
    monkeypatch.setattr(tr, "cpu_bf16_native", lambda: True)
    assert tr.use_bf16("bf16", cpu) is True and capsys.readouterr().err == ""


def test_batches_of_like_lengths_cover_the_split_once_and_pad_less_than_shuffling():
    from tasks.train import like_lengths

    lengths = torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(2))
    batches = like_lengths(perm, lengths, 64, 8, torch.Generator().manual_seed(3))
    assert len(batches) == len(perm.split(64)) == 16
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))  # each example once an epoch

    def padding(bs):  # positions computed beyond each example's own length, a batch running to its longest
        return sum(int((lengths[b].max() - lengths[b]).sum()) for b in bs)

    assert padding(batches) < 0.2 * padding(perm.split(64))
    again = like_lengths(perm, lengths, 64, 8, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # one seeded stream: resumable
    shortest = [int(lengths[b].min()) for b in batches]
    assert shortest != sorted(shortest)  # the batches themselves in a random order, not shortest first
