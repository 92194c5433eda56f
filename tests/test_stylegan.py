"""StyleGAN: the networks (mapping, constant, AdaIN, noise, mixing, truncation), GanStep's extensions (the
mapping's param group, R1), bit-for-bit resume, the mnist32 / colour_digits sources, the style-generation kind
through the stages (mixing metrics, grid, registration) and `nnlab sample --truncation`."""
import copy
import math
import uuid

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows import cli, serve
from models.registry import create_model, get_spec
from tasks.config import TrainConfig, validate
from tasks.kinds.gan import GanStep
from tasks.kinds import get_kind, kind_of, main_metric, register_name
from tasks.sources import misfit
from tasks.kinds.generation import ServedSampler
from tasks.kinds.style import ServedStyleSampler, StyleSampler, ink_colours, mixing_grid
from tasks.train import Split, Trainer, seed_everything

CPU = torch.device("cpu")
TINY = {"channels": 4, "latent_dim": 8, "w_dim": 8, "mapping_layers": 2}


def style_gan(shape=(1, 8, 8), **options):
    torch.manual_seed(0)
    return create_model("stylegan", input_shape=shape, num_classes=10, **{**TINY, **options})


def style_trainer(seed: int = 0, options: dict | None = None, **train) -> Trainer:
    seed_everything(seed)
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 2e-3, "device": "cpu", **train})
    model = create_model("stylegan", input_shape=(1, 8, 8), num_classes=10, **{**TINY, **(options or {})})
    return Trainer(model, cfg, seed, CPU, GanStep(model, cfg, seed, CPU))


def images(n: int = 48, seed: int = 1) -> Split:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Split(x, torch.zeros(n, dtype=torch.long))


# ---------------------------------------------------------------- the networks


def test_registered_as_a_style_generator_ranked_like_the_other_gans():
    spec = get_spec("stylegan")
    assert spec.family == "gan" and spec.kind == "style_generation"
    kind = kind_of("stylegan", "colour_digits")
    assert kind is get_kind("style_generation") and kind.registry == "nnlab-generator"
    assert kind.metric_for("colour_digits") == "classifier_fid" and "classifier_fid" in kind.lower_is_better
    assert "colour_digits" in misfit("stylegan", "ring8")  # image sources only: no styles for 2-D points
    both = validate({"data": {"source": "mnist32"}, "models": {"stylegan": {}, "dcgan": {}}})
    assert main_metric(both) == "classifier_fid" and register_name(both) == "nnlab-generator-mnist32"  # compete as one


@pytest.mark.parametrize("shape, num_ws, coarse", [((3, 32, 32), 8, 4), ((1, 28, 28), 6, 2), ((1, 8, 8), 4, 2)])
def test_shapes_range_gradients_and_the_coarse_fine_split(shape, num_ws, coarse):
    gan = style_gan(shape)
    G = gan.generator
    assert (G.num_ws, G.coarse_layers, G.out_shape) == (num_ws, coarse, shape)
    assert G.synthesis.const.shape[2:] == ((7, 7) if shape[1] == 28 else (4, 4))  # the learned constant input
    fake = G(gan.noise(5))  # training mode: mixing, fresh noise, w_avg update
    assert fake.shape == (5, *shape) and fake.min() >= -1 and fake.max() <= 1
    out = gan(fake)
    assert out.shape == (5, 1) and torch.isfinite(out).all() and gan.features(fake).dim() == 2
    (out.sum() + gan(torch.randn(5, *shape)).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gan.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())  # the sampling average: no gradient
    s = gan.sample(3, torch.Generator().manual_seed(1))
    assert s.shape == (3, *shape) and G.training
    assert torch.equal(s, gan.sample(3, torch.Generator().manual_seed(1)))  # eval: fixed noise, no mixing


def test_mixing_takes_coarse_layers_from_a_and_fine_from_b():
    G = style_gan((3, 32, 32)).generator.eval()
    w_a, w_b = G.mapping(torch.randn(2, 8)), G.mapping(torch.randn(2, 8))
    ws = G.mix(w_a, w_b)  # (B, num_ws, w_dim)
    assert torch.equal(ws[:, :4], w_a[:, None].expand(-1, 4, -1)) and torch.equal(ws[:, 4:], w_b[:, None].expand(-1, 4, -1))
    with torch.no_grad():
        a, b, ab = (G.synthesis(x) for x in (G.broadcast(w_a), G.broadcast(w_b), ws))
    assert not torch.allclose(ab, a) and not torch.allclose(ab, b)
    grid = mixing_grid(G, [127.5] * 3, [127.5] * 3, 255.0, CPU, 0, rows=3)
    assert grid.shape == (16, 3, 32, 32) and (grid[0] == 1).all()  # a blank corner, 3 + 3 sources, 9 mixes

    seen = []  # in training the generator mixes by itself: two ws in one batch with probability mixing_prob
    G.train()
    G.synthesis.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    G.mixing_prob = 1.0
    G(torch.randn(4, 8))
    assert not torch.equal(seen[-1][:, 0], seen[-1][:, -1])
    G.mixing_prob = 0.0
    G(torch.randn(4, 8))
    assert torch.equal(seen[-1][:, 0], seen[-1][:, -1])


def test_w_avg_is_tracked_in_training_and_truncation_pulls_towards_it():
    gan = style_gan((1, 8, 8))
    G = gan.generator
    assert torch.equal(G.w_avg, torch.zeros(8))
    G(torch.randn(64, 8))
    after = G.w_avg.clone()
    assert after.abs().sum() > 0
    G.eval()
    z = torch.randn(6, 8)
    with torch.no_grad():
        mean_image = G.synthesis(G.broadcast(G.w_avg[None]))
        assert torch.equal(G.w_avg, after)  # eval leaves it alone
        assert torch.allclose(G(z, psi=0.0), mean_image.expand(6, -1, -1, -1), atol=1e-6)  # psi 0: the mean w
        assert torch.equal(G(z, psi=1.0), G(z))
    sampler = StyleSampler(G, 8, [127.5], [127.5], 255.0).eval()
    assert sampler(z).min() >= 0 and sampler(z).max() <= 255
    sampler.truncation.fill_(0.0)
    assert torch.allclose(sampler(z), sampler(z[:1]).expand(6, -1, -1, -1), atol=1e-4)


# ---------------------------------------------------------------- GanStep's extensions


def test_mapping_network_trains_at_its_own_lr():
    t = style_trainer(lr=1e-3, schedule="cosine", epochs=4)
    groups = t.step.opt_g.param_groups
    G = t.model.generator
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-5)]  # mapping_lr_mult 0.01
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in G.mapping.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(G.parameters()))
    assert groups[0]["betas"] == (0.0, 0.99) and t.step.opt_d.param_groups[0]["betas"] == (0.0, 0.99)
    h = t.fit(images(), None).history
    assert h[0]["lr_mapping"] == pytest.approx(h[0]["lr_g"] / 100)
    assert h[1]["lr_g"] < h[0]["lr_g"] and h[1]["lr_mapping"] == pytest.approx(h[1]["lr_g"] / 100)  # one schedule


def test_losses_finite_with_r1_and_both_networks_move():
    t = style_trainer(epochs=2, options={"r1_every": 2})  # 3 steps an epoch: R1 at steps 2, 4 and 6
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    h = t.fit(images(), None).history
    for e in h:
        assert all(math.isfinite(e[k]) for k in ("d_loss", "g_loss", "d_real", "d_fake", "r1_penalty"))
    assert h[-1]["r1_penalty"] > 0 and 0 < h[-1]["d_real"] < 1
    assert t.step.r1_seen == 32  # lazy: the last epoch's steps 4 and 6 of its 4, 5 and 6 (16 images each)
    after = t.model.state_dict()
    for part in ("generator.mapping", "generator.synthesis", "discriminator"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    no_r1 = style_trainer(options={"r1_gamma": 0.0}).fit(images(), None).history[-1]
    assert "r1_penalty" not in no_r1


def test_checkpoint_resume_is_bit_identical():
    data = images(64, seed=3)
    first = style_trainer(seed=2, epochs=2)
    first.fit(data, None)
    state = copy.deepcopy(first.state_dict())
    first.cfg.epochs = 3
    first.fit(data, None)  # straight on: epoch 3

    torch.manual_seed(123)  # a fresh process would have another RNG state: the checkpoint must restore it
    resumed = style_trainer(seed=2, epochs=3)
    resumed.load_state_dict(state)
    resumed.fit(data, None)

    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert resumed.steps == first.steps and strip(resumed.history) == strip(first.history)
    for (k, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # mapping, synthesis (noise buffers), w_avg, discriminator
    for opt in ("opt_g", "opt_d"):
        sa, sb = getattr(first.step, opt).state_dict(), getattr(resumed.step, opt).state_dict()
        assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]
        assert sa["state"].keys() == sb["state"].keys()
        assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])
    assert len(first.step.opt_g.state_dict()["param_groups"]) == 2  # the mapping's group is in the checkpoint
    assert torch.equal(first.step.fixed_samples(), resumed.step.fixed_samples())


# ---------------------------------------------------------------- data


def test_mnist32_and_colour_digits_sources(monkeypatch):
    from tasks.data import images as data
    from tasks.data.images import COLOUR_SEED, PALETTE, read_colour_digits, read_mnist32
    from tasks.sources import data_kind

    cfg = validate({"data": {"source": "colour_digits"}}).data
    x28, y, _, classes = mnist5k = data.read_mnist5k(cfg)
    monkeypatch.setattr(data, "read_mnist5k", lambda cfg: mnist5k)  # read once (seconds on a busy machine)
    x32, y32, _, _ = read_mnist32(cfg)
    assert x32.shape == (5000, 1, 32, 32) and np.array_equal(x32[:, :, 2:30, 2:30], x28) and np.array_equal(y32, y)
    assert not x32[:, :, :2].any() and not x32[:, :, :, 30:].any()
    xc, yc, test, _, extra = read_colour_digits(cfg)
    assert xc.shape == (5000, 3, 32, 32) and xc.dtype == np.uint8 and np.array_equal(yc, y) and test is None
    assert extra["palette"]["names"] == list(PALETTE) and len(extra["palette"]["rgb"]) == 6
    truth = np.random.default_rng(COLOUR_SEED).integers(0, 6, 5000)
    assert np.array_equal(ink_colours(xc, extra["palette"]["rgb"]), truth)  # colour read back from pixels
    assert np.bincount(truth[y == 3], minlength=6).min() > 50  # every colour on every digit
    assert np.array_equal(xc, read_colour_digits(cfg)[0])  # deterministic
    assert data_kind("mnist32") == data_kind("colour_digits") == "images"


# ---------------------------------------------------------------- nnlab sample --truncation


def test_sample_truncation_needs_a_mapping_network(tmp_path, monkeypatch):
    G = style_gan((1, 8, 8)).generator
    style = StyleSampler(G, 8, [8.0], [8.0], 16.0).eval()
    meta = {"nnlab.kind": "generator", "latent_dim": 8, "image": True, "max_value": 16.0, "truncation": True}
    monkeypatch.setattr(serve, "served_model", lambda ref: ServedStyleSampler(style, None, meta, "models:/g/1"))
    res = CliRunner().invoke(cli.app, ["sample", "-n", "4", "-o", str(tmp_path / "s.png"), "--truncation", "0.5"])
    assert res.exit_code == 0, res.output
    assert style.truncation == 0.5 and (tmp_path / "s.png").stat().st_size > 500
    bad = CliRunner().invoke(cli.app, ["sample", "--truncation", "0", "-o", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "(0, 1]" in bad.output

    plain = {"nnlab.kind": "generator", "nnlab.arch": "dcgan", "latent_dim": 8, "image": True, "max_value": 16.0}
    monkeypatch.setattr(serve, "served_model", lambda ref: ServedSampler(None, None, plain, "models:/dc/1"))
    res = CliRunner().invoke(cli.app, ["sample", "--truncation", "0.7", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "no mapping network" in res.output and "dcgan" in res.output


# ---------------------------------------------------------------- the effect, through the stages


@pytest.mark.slow
def test_mixed_digits_keep_the_class_of_the_coarse_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from tasks.data import prepare
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client

    name = f"style-{uuid.uuid4().hex[:6]}"
    cfg = validate({"data": {"source": "colour_digits", "max_train": 600},
                    "train": {"epochs": 4, "lr": 0.002, "batch_size": 32, "device": "cpu"},
                    "register": {"name": name}, "models": {"stylegan": {"channels": 8}}})
    prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, "stylegan", "d", "out")
    r = evaluate_stage(cfg, "stylegan", "d", "out", "m.json", "p")
    assert r["mixing_class_chance"] == 0.1 and r["mixing_colour_chance"] == pytest.approx(1 / 6)
    assert r["mixing_class_follows_coarse"] > r["mixing_class_chance"] + 0.1, r
    assert r["mixing_colour_follows_fine"] > r["mixing_colour_chance"] + 0.1, r
    assert 0 < r["classifier_fid"] and {"mixing_class_follows_fine", "mixing_colour_follows_coarse"} <= set(r)

    plots = {a.path for a in client().list_artifacts(trained.run_id, "plots")}
    assert {"plots/style_mixing.png", "plots/style_mixing_test.png", "plots/samples_evolution.png"} <= plots
    run = client().get_run(trained.run_id)
    assert run.data.tags["nnlab.family"] == "gan" and "mixing_class_follows_coarse" in run.data.metrics
    out = register_stage(cfg, [r], None)
    # 4 epochs at 8 channels cover few classes on some CPUs (floating-point order): then the health rule bars it
    assert out["name"] == name and out["alias"] == ("challenger" if "mode_collapse" in r["health"] else "champion"), \
        (out, r["health"])
    res = CliRunner().invoke(cli.app, ["sample", "--model", f"models:/{name}@{out['alias']}", "-n", "9", "-o",
                                       str(tmp_path / "t.png"), "--truncation", "0.7"])
    assert res.exit_code == 0, res.output
    assert "psi 0.7" in res.output and (tmp_path / "t.png").stat().st_size > 1000


def test_train_init_leaves_the_equalised_layers_their_unit_normal_weights():
    from tasks.initialization import init_weights

    gan = style_gan((1, 8, 8))
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    kept = init_weights(gan, "xavier_uniform")
    assert kept > 0 and all(torch.equal(before[k], v) for k, v in gan.state_dict().items())


def test_samples_come_from_the_moving_average_of_the_generator_with_its_half_life_ramped_up():
    gan = style_gan((1, 8, 8))
    start = [p.clone() for p in gan.generator_ema.parameters()]
    with torch.no_grad():
        for p in gan.generator.parameters():
            p.add_(1.0)
    gan.update_ema(images_seen=1_000, batch=16)  # half-life min(10,000, 0.05 x 1,000) = 50 images
    moved = 1 - 0.5 ** (16 / 50)
    for s, avg, p in zip(start, gan.generator_ema.parameters(), gan.generator.parameters()):
        assert torch.allclose(avg, s + moved * (p - s), atol=1e-5)
    assert gan.sampling_generator is gan.generator_ema and not gan.train().generator_ema.training
    plain = style_gan((1, 8, 8), ema_images=0)
    assert plain.generator_ema is None and plain.sampling_generator is plain.generator
