import copy
import math

import numpy as np
import pytest
import torch

from models.registry import create_model, get_spec, list_models
from tasks.config import TrainConfig
from tasks.kinds.gan import FIXED_NOISE, RING8_CENTERS, GanStep, class_coverage, frechet_distance, label_entropy, mode_collapse, mode_coverage
from tasks.data.points import centers, ring8
from tasks.figures import evolution_strip, points_figure, sample_grid_figure
from tasks.train import NonFiniteLoss, Split, Trainer, seed_everything

CPU = torch.device("cpu")
GANS = [n for n in list_models() if get_spec(n).kind == "generation"]  # stylegan, pix2pix, cyclegan: own tests
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2,)]


def ring_split(n: int, seed: int = 0) -> Split:
    x, y = ring8(n, seed)
    return Split(torch.tensor(x), torch.tensor(y))


def gan_trainer(arch: str, shape=(2,), seed: int = 0, options: dict | None = None, **train) -> Trainer:
    seed_everything(seed)
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 128, "lr": 1e-3, "device": "cpu", **train})
    model = create_model(arch, input_shape=shape, num_classes=8, **(options or {}))
    return Trainer(model, cfg, seed, CPU, GanStep(model, cfg, seed, CPU))


# ---------------------------------------------------------------- the networks


def test_the_three_gans_are_registered():
    assert set(GANS) == {"gan_mlp", "dcgan", "wgan_gp"}
    assert create_model("dcgan", input_shape=(2,), num_classes=1).kind == "bce"
    assert create_model("wgan_gp", input_shape=(2,), num_classes=1).kind == "wasserstein"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GANS)
def test_generator_and_discriminator_shapes_range_and_gradients(name, shape):
    torch.manual_seed(0)
    gan = create_model(name, input_shape=shape, num_classes=10, latent_dim=16)
    z = gan.noise(5)
    assert z.shape == (5, 16)
    fake = gan.generator(z)
    assert fake.shape == (5, *shape)
    if len(shape) == 3:  # images: tanh output, the data scaled to [-1, 1]
        assert fake.min() >= -1 and fake.max() <= 1
    out = gan(fake)
    assert out.shape == (5, 1) and torch.isfinite(out).all()
    assert gan.features(fake).dim() == 2
    (out.sum() + gan(torch.randn(5, *shape)).sum()).backward()
    grads = [p.grad for p in gan.parameters() if p.grad is not None]
    assert len(grads) == len(list(gan.parameters()))  # both networks reached
    assert all(torch.isfinite(g).all() for g in grads)
    s = gan.sample(3, torch.Generator().manual_seed(1))
    assert s.shape == (3, *shape) and not s.requires_grad and gan.generator.training
    assert torch.equal(s, gan.sample(3, torch.Generator().manual_seed(1)))  # same generator seed, same samples


def test_critic_has_no_batch_norm_and_dcgan_d_first_layer_has_none():
    w = create_model("wgan_gp", input_shape=(1, 28, 28), num_classes=1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in w.discriminator.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in w.discriminator.modules())
    d = create_model("dcgan", input_shape=(3, 32, 32), num_classes=1)
    layers = list(d.discriminator.features)
    assert isinstance(layers[0], torch.nn.Conv2d) and isinstance(layers[1], torch.nn.LeakyReLU)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in layers) == 3  # 32 -> 16 -> 8 -> 4


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match="use gan_mlp"):
        create_model("dcgan", input_shape=(1, 6, 6), num_classes=1)
    with pytest.raises(ValueError, match="images"):
        create_model("gan_mlp", input_shape=(10, 3), num_classes=1)
    with pytest.raises(Exception, match="label_smoothing"):  # no labels to smooth in a Wasserstein loss
        create_model("wgan_gp", input_shape=(2,), num_classes=1, label_smoothing=0.1)


# ---------------------------------------------------------------- measurements


def test_ring8_is_seeded_and_on_the_circle():
    x, y = ring8(800, seed=3)
    assert x.shape == (800, 2) and x.dtype == np.float32 and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(8))
    assert np.allclose(np.linalg.norm(RING8_CENTERS, axis=1), 2.0)
    assert np.abs(x - RING8_CENTERS[y]).max() < 0.02 * 6
    assert np.array_equal(x, ring8(800, seed=3)[0]) and not np.array_equal(x, ring8(800, seed=4)[0])
    assert np.allclose(centers(4, 1.0), [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-6)


def test_constant_generator_covers_one_mode_and_is_collapsed():
    fake = np.tile(RING8_CENTERS[2] + 0.01, (1000, 1))
    cov = mode_coverage(fake, RING8_CENTERS, std=0.02)
    assert cov == {"modes_covered": 1, "high_quality_fraction": 1.0, "mode_overlap": 1 / 8}
    assert mode_collapse(cov["modes_covered"], 8)
    real = mode_coverage(ring8(4000, seed=0)[0], RING8_CENTERS, std=0.02)
    # within 3 std in 2-D (Euclidean): P(chi2_2 <= 9) = 1 - exp(-4.5) = 0.989 of a Gaussian's own samples
    assert real["modes_covered"] == 8 and real["high_quality_fraction"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)
    assert not mode_collapse(real["modes_covered"], 8)
    assert real["mode_overlap"] > 0.97  # each mode near its 1/8, minus the 1.1% beyond 3 std
    assert mode_collapse(3, 8) and not mode_collapse(4, 8)  # the rule: fewer than half


def test_mode_coverage_min_share_and_far_samples():
    x, _ = ring8(1000, seed=1)
    far = np.zeros((1000, 2), np.float32)  # the centre of the ring: near no mode
    cov = mode_coverage(np.concatenate([x[:5], far]), RING8_CENTERS, std=0.02)  # 5 of 1005: under 1% each
    assert cov["modes_covered"] == 0 and cov["high_quality_fraction"] == pytest.approx(5 / 1005)


def test_class_coverage_and_label_entropy():
    eye = np.eye(10)
    uniform = eye[np.arange(1000) % 10]
    assert class_coverage(uniform) == 10 and label_entropy(uniform) == pytest.approx(math.log(10))
    one = eye[np.full(500, 3)]
    assert class_coverage(one) == 1 and label_entropy(one) == 0.0
    half = np.array([[0.9, 0.1, 0.0]] * 50 + [[0.2, 0.3, 0.5]] * 50)  # soft probabilities: the argmax counts
    assert class_coverage(half) == 2 and label_entropy(half) == pytest.approx(math.log(2))
    rare = eye[np.r_[np.zeros(99, int), 9]]  # class 9 gets 1% of the samples: below the 2% share
    assert class_coverage(rare) == 1 and class_coverage(rare, min_share=0.01) == 2


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 8))  # correlated features
    a -= a.mean(0)  # mean 0, so 2 * a has the same mean
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.arange(8) / 4
    assert frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    # same mean, covariance scaled by 4: for commuting covariances Tr(S + 4S - 2 * 2S) = Tr(S)
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-5)
    few = rng.normal(size=(5, 32))  # 5 samples of 32 features: singular covariances, still a finite number
    assert np.isfinite(frechet_distance(few, few + 1.0))


def test_figures():
    import matplotlib.pyplot as plt

    imgs = np.random.default_rng(0).random((16, 1, 8, 8))
    x, _ = ring8(200, seed=0)
    figs = [sample_grid_figure(imgs, 4, "grid"), sample_grid_figure(np.random.rand(4, 3, 32, 32), 2, "rgb"),
            points_figure(x, x + 0.1, RING8_CENTERS, "points"),
            evolution_strip([imgs, imgs * 0.5, imgs * 0.2], [1, 5, 10], "images"),
            evolution_strip([x, x * 0.5], [1, 2], "points", centers=RING8_CENTERS)]
    for fig in figs:
        assert len(fig.axes) >= 1
        plt.close(fig)


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_gan_mlp_covers_most_modes_of_ring8():
    # Settings measured on 1 CPU thread (8 seeds: 6-8 modes, about 12 s each): label smoothing 0.1 and a cosine
    # lr settle the oscillation between modes; latent 8 is plenty for 2-D data.
    t = gan_trainer("gan_mlp", seed=0, options={"latent_dim": 8, "label_smoothing": 0.1},
                    epochs=80, batch_size=128, lr=2e-3, schedule="cosine")
    res = t.fit(ring_split(4096), None)
    fake = t.model.sample(2000, torch.Generator().manual_seed(0)).numpy()
    cov = mode_coverage(fake, RING8_CENTERS, std=0.02)
    assert cov["modes_covered"] >= 6 and cov["high_quality_fraction"] > 0.5, cov
    assert not mode_collapse(cov["modes_covered"], 8)
    assert res.epochs == 80 and set(res.history[-1]) >= {"d_loss", "g_loss", "d_real", "d_fake", "epoch_seconds"}
    assert 0 < res.history[-1]["d_real"] < 1 and 0 < res.history[-1]["d_fake"] < 1  # probabilities for BCE


@pytest.mark.parametrize("arch", ["dcgan", "wgan_gp"])
def test_checkpoint_resume_is_bit_identical(arch):
    data = ring_split(1024, seed=1)
    first = gan_trainer(arch, seed=2, epochs=2)
    first.fit(data, None)
    state = copy.deepcopy(first.state_dict())
    first.cfg.epochs = 3
    first.fit(data, None)  # straight on: epoch 3

    torch.manual_seed(123)  # a fresh process would have another RNG state: the checkpoint must restore it
    resumed = gan_trainer(arch, seed=2, epochs=3)
    resumed.load_state_dict(state)
    resumed.fit(data, None)

    assert resumed.epoch == first.epoch == 3 and resumed.steps == first.steps
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(first.history)
    for (k, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # generator and discriminator, weights and batch-norm buffers
    for opt in ("opt_g", "opt_d"):
        sa, sb = getattr(first.step, opt).state_dict()["state"], getattr(resumed.step, opt).state_dict()["state"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert torch.equal(first.step.fixed_samples(), resumed.step.fixed_samples())


def test_wgan_gp_reports_penalty_and_gap_on_images():
    x = torch.rand(96, 1, 8, 8) * 2 - 1
    t = gan_trainer("wgan_gp", shape=(1, 8, 8), options={"channels": 8, "n_critic": 2}, batch_size=32, epochs=2)
    seen = []
    res = t.fit(Split(x, torch.zeros(96, dtype=torch.long)), None, on_epoch=lambda e, m, tr: seen.append(e),
                progress=lambda i, n: None)
    h = res.history[-1]
    assert seen == [1, 2] and t.steps == 6
    assert math.isfinite(h["gradient_penalty"]) and h["gradient_penalty"] > 0
    assert h["critic_gap"] == pytest.approx(h["d_real"] - h["d_fake"])
    assert math.isfinite(h["g_loss"]) and math.isfinite(h["d_loss"])
    assert t.step.fixed_samples().shape == (FIXED_NOISE, 1, 8, 8) and t.model.generator.training


@pytest.mark.parametrize("options", [{"feature_matching": True}, {"label_smoothing": 0.2, "n_critic": 2}])
def test_dcgan_trains_on_images_with_stabilisers(options):
    x = torch.rand(64, 1, 8, 8) * 2 - 1
    t = gan_trainer("dcgan", shape=(1, 8, 8), options={"channels": 8, **options}, batch_size=16, epochs=1)
    before = [p.detach().clone() for p in t.model.generator.parameters()]
    h = t.fit(Split(x, torch.zeros(64, dtype=torch.long)), None).history[-1]
    assert math.isfinite(h["g_loss"]) and "critic_gap" not in h
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.generator.parameters()))


@pytest.mark.parametrize("arch", ["gan_mlp", "wgan_gp"])
def test_non_finite_loss_raises(arch):
    data = ring_split(512)
    data.x[300] = float("nan")  # one poisoned point: the discriminator step that draws it goes non-finite
    t = gan_trainer(arch, epochs=2, batch_size=512)
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 1 \(discriminator\)"):
        t.fit(data, None)


def test_per_network_learning_rates_and_betas():
    t = gan_trainer("gan_mlp", options={"lr_g": 2e-4, "betas": (0.3, 0.99)}, lr=1e-3)
    assert t.step.opt_g.param_groups[0]["lr"] == 2e-4 and t.step.opt_d.param_groups[0]["lr"] == 1e-3
    assert t.step.opt_g.param_groups[0]["betas"] == (0.3, 0.99)
    w = gan_trainer("wgan_gp")
    assert w.step.opt_d.param_groups[0]["betas"] == (0.0, 0.9) and w.model.options.n_critic == 5


def test_a_dcgan_sampler_is_exported_in_eval_mode_so_a_sample_does_not_depend_on_its_batch():
    from tasks.kinds.generation import Generation

    model = create_model("dcgan", input_shape=(1, 28, 28), num_classes=10)
    sampler = Generation().wrap(copy.deepcopy(model), {"input_shape": [1, 28, 28], "source": "mnist5k"},
                                [0.5], [0.5])
    assert not any(m.training for m in sampler.modules())
    z = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(sampler(z)[:1], sampler(z[:1]), atol=1e-5)
