"""Image-to-image GANs: the networks, the paired and unpaired sources, the steps (losses, the image pool,
resume bit for bit), and each trained briefly through the stages with its measurable effect: pix2pix beats its
untrained self on L1 and SSIM, CycleGAN's translations are read better by the target-domain classifier than
the untranslated images, and `nnlab sample --input` translates a PNG."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from models.registry import create_model
from tasks.config import TrainConfig, validate
from tasks.data import load_prepared, prepare
from models.image2image import ImagePool
from tasks.kinds.image2image import CycleStep, Pix2PixStep, image_scores
from tasks.data.image_pairs import edges, load_labels, low_resolution, occluded
from tasks.train import Split, Trainer, seed_everything

CPU = torch.device("cpu")
TINY = {"channels": 8, "d_channels": 8}


@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 32, 32)])
@pytest.mark.parametrize("arch", ["pix2pix", "cyclegan"])
def test_generators_keep_the_shape_and_discriminators_judge_patches(arch, shape):
    m = create_model(arch, input_shape=shape, num_classes=10, **TINY)
    a = torch.rand(3, *shape) * 2 - 1
    out = m(a)
    assert out.shape == a.shape and out.abs().max() <= 1  # tanh: [-1, 1]
    d = m.discriminators()[0]
    patches = d(torch.cat([a, out], 1) if arch == "pix2pix" else out)
    assert patches.shape[:2] == (3, 1) and patches.shape[-1] > 1  # a grid of patch logits, not one number
    patches.mean().backward()
    assert all(p.grad is not None for p in m.generators()[0].parameters())


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="multiples of 16"):
        create_model("pix2pix", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match="images"):
        create_model("cyclegan", input_shape=(2,), num_classes=10)
    assert not create_model("pix2pix", input_shape=(1, 32, 32), num_classes=10, adversarial=False).discriminators()
    with pytest.raises(ValueError, match="data.pairing"):
        validate({"data": {"source": "paired", "pairing": "sketch"}, "models": {"pix2pix": {}}})
    with pytest.raises(ValueError, match="cyclegan, pix2pix"):  # image pairs train image-to-image models only
        validate({"data": {"source": "paired"}, "models": {"simple_cnn": {}}})
    with pytest.raises(ValueError, match="from paired, unpaired data"):
        validate({"data": {"source": "digits"}, "models": {"pix2pix": {}}})


def test_paired_inputs_are_made_from_the_digit():
    digit = np.zeros((2, 1, 32, 32), np.uint8)
    digit[:, :, 8:24, 14:18] = 255  # a "1"
    e = edges(digit)
    assert set(np.unique(e)) == {0, 255} and e[0, 0, 16, 13:19].any() and not e[0, 0, 16, 16]  # outline, not fill
    low = low_resolution(digit)
    assert low.shape == digit.shape and 0 < low[0, 0, 16, 16] and len(np.unique(low)) > 2  # blurred back up
    occ = occluded(digit, seed=3)
    assert (occ == 128).sum(axis=(1, 2, 3)).tolist() == [144, 144]  # a 12x12 grey square in each
    assert np.array_equal(occ, occluded(digit, seed=3))
    assert image_scores(digit, digit, "same")["same_ssim"] == pytest.approx(1.0)
    assert image_scores(255 - digit, digit, "inv")["inv_l1"] == pytest.approx(1.0)


def test_image_pool_returns_past_fakes_and_restores():
    pool = ImagePool(4, seed=0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling up: the newest come back
    later = pool.query(torch.full((64, 1, 1, 1), 9.0))
    assert (later != 9).any() and (later == 9).any()  # half the time an older fake instead
    state = copy.deepcopy(pool.state_dict())
    again = ImagePool(4, seed=1)
    again.load_state_dict(state, CPU)
    batch = torch.full((16, 1, 1, 1), 7.0)
    assert torch.equal(pool.query(batch), again.query(batch))
    assert torch.equal(ImagePool(0, 0).query(first), first)


def test_the_pool_keeps_each_fakes_class_with_it():
    pool = ImagePool(4, seed=0)
    for k in range(5):  # image k is filled with k, its class is k: what comes back must still agree
        x = torch.arange(8.0).view(8, 1, 1, 1) + 8 * k
        images, classes = pool.query(x, x.view(-1).long())
        assert torch.equal(images.view(-1).long(), classes)
    assert (images.view(-1) < 32).any()  # past fakes did come back
    state = copy.deepcopy(pool.state_dict())
    again = ImagePool(4, seed=1)
    again.load_state_dict(state, CPU)
    x = torch.full((16, 1, 1, 1), 99.0)
    assert all(torch.equal(u, v) for u, v in zip(pool.query(x, x.view(-1).long()), again.query(x, x.view(-1).long())))


def test_a_conditional_cyclegans_discriminators_judge_the_class_too():
    torch.manual_seed(0)
    model = create_model("cyclegan", input_shape=(1, 32, 32), num_classes=10, conditional=True, **TINY)
    x = torch.randn(2, 1, 32, 32)
    seven, one = model.d_b(x, torch.tensor([7, 7])), model.d_b(x, torch.tensor([1, 1]))
    assert seven.shape == model.d_b.logit(model.d_b.features(x)).shape  # one logit per patch, as unconditioned
    assert not torch.allclose(seven, one)  # the same image, another class: another verdict
    seven.mean().backward()
    assert model.d_b.embed.weight.grad[7].abs().sum() > 0 and model.d_b.embed.weight.grad[1].abs().sum() == 0
    with pytest.raises(ValueError, match="conditional needs both domains' labels"):
        create_model("cyclegan", input_shape=(1, 32, 32), num_classes=0, conditional=True, **TINY)


def _trainer(arch: str, seed: int = 0, epochs: int = 1, batch_size: int = 16, lr: float = 2e-4,
             **options) -> Trainer:
    seed_everything(seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, device="cpu")
    model = create_model(arch, input_shape=(1, 32, 32), num_classes=10, **{**TINY, **options})
    step = (Pix2PixStep if arch == "pix2pix" else CycleStep)(model, cfg, seed, CPU)
    return Trainer(model, cfg, seed, CPU, step)


@pytest.mark.parametrize("arch", ["pix2pix", "cyclegan"])
def test_resume_is_bit_identical_and_losses_are_finite(arch):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.rand(48, 1, 32, 32, generator=g) * 2 - 1, torch.rand(48, 1, 32, 32, generator=g) * 2 - 1)
    options = {"blocks": 1, "pool_size": 8} if arch == "cyclegan" else {"depth": 3}
    first = _trainer(arch, seed=2, epochs=1, **options)
    first.fit(data, data)
    state = copy.deepcopy(first.state_dict())
    first.cfg.epochs = 2
    first.fit(data, data)
    torch.manual_seed(99)  # another process's RNG: the checkpoint must restore everything
    resumed = _trainer(arch, seed=2, epochs=2, **options)
    resumed.load_state_dict(state)
    resumed.fit(data, data)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(first.history)
    assert all(np.isfinite(v) for v in first.history[-1].values())
    for (k, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # every network
    for opt in ("opt_g", "opt_d"):
        sa, sb = getattr(first.step, opt).state_dict()["state"], getattr(resumed.step, opt).state_dict()["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    keys = {"val_l1", "val_psnr", "train_l1"} if arch == "pix2pix" else {"val_cycle_l1_a", "cycle_l1", "identity_l1"}
    assert keys <= first.history[-1].keys()


def test_l1_only_pix2pix_has_no_discriminator_step():
    t = _trainer("pix2pix", adversarial=False, depth=3)
    data = Split(torch.rand(16, 1, 32, 32) * 2 - 1, torch.rand(16, 1, 32, 32) * 2 - 1)
    t.fit(data, None)
    assert t.step.opt_d is None and t.history[-1]["d_loss"] == 0 and "lr_d" not in t.history[-1]


# ---------------------------------------------------------------- through the stages


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("i2i")


def _run(cfg, name, workdir, tag):
    from tasks.stages import evaluate_stage, train_stage

    prepare(cfg.data, 0, workdir / f"d-{tag}")
    trained = train_stage(cfg, name, workdir / f"d-{tag}", workdir / f"out-{tag}")
    r = evaluate_stage(cfg, name, workdir / f"d-{tag}", workdir / f"out-{tag}", workdir / f"m-{tag}.json",
                       workdir / f"p-{tag}")
    return trained, r


@pytest.mark.slow
def test_pix2pix_on_edges_beats_its_untrained_self_and_translates_a_png(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.kinds.image2image import ImageTranslator, translate
    from tasks.networks import load_trained
    from tasks.tracking import client

    cfg = validate({"data": {"source": "paired", "pairing": "edges", "max_train": 400, "test_fraction": 0.05,
                             "val_fraction": 0.05},
                    "train": {"epochs": 3, "batch_size": 16, "lr": 0.001, "device": "cpu"},
                    "register": {"name": "i2i-test"},
                    "models": {"pix2pix": {"channels": 16, "d_channels": 16, "depth": 4, "lambda_l1": 100,
                                           "test_dropout": False}}})  # served == trained, below, without noise
    seed_everything(0)
    untrained = create_model("pix2pix", input_shape=(1, 32, 32), num_classes=10, channels=16, d_channels=16,
                             test_dropout=False)
    trained, r = _run(cfg, "pix2pix", workdir, "p")
    data = load_prepared(workdir / "d-p")
    assert np.array_equal(load_labels(workdir / "d-p")["a_test"], load_labels(workdir / "d-p")["b_test"])  # paired
    before = image_scores(translate(ImageTranslator(untrained.generator).eval(), data.x_test, CPU), data.y_test, "u")
    assert r["test_l1"] < 0.5 * before["u_l1"] and r["test_ssim"] > before["u_ssim"] + 0.2, (r, before)
    assert r["test_l1"] < r["baseline_l1"]  # closer to the digit than its edge map is
    assert r["class_agreement"] > 0.5 and r["target_accuracy"] > 0.5 and r["classifier_fid"] > 0
    run = client().get_run(trained.run_id)
    assert run.data.tags["nnlab.family"] == "gan" and "edge map" in run.data.tags["nnlab.image2image.baseline"]
    arts = {a.path for a in client().list_artifacts(trained.run_id, "plots")}
    assert {"plots/translations.png", "plots/learning_curve.png", "plots/translation_classes.png"} <= arts
    shares = [r[f"class_agreement_{k}"] for k in range(10) if f"class_agreement_{k}" in r]
    assert shares and all(0 <= v <= 1 for v in shares) and 0 < r["class_agreement_se"] < 0.1
    assert len(client().list_artifacts(trained.run_id, "samples")) == 3
    assert len(client().get_metric_history(trained.run_id, "val_l1")) == 3

    from tasks.stages import register_stage

    assert register_stage(cfg, [r], None)["alias"] == "champion"
    png, out = workdir / "edge.png", workdir / "digit.png"
    Image.fromarray(data.x_test[0, 0]).save(png)
    done = CliRunner().invoke(app, ["sample", "--model", "models:/i2i-test@champion", "--input", str(png),
                                    "-o", str(out)])
    assert done.exit_code == 0, done.output
    model, _ = load_trained(workdir / "out-p" / "model.pt")
    want = translate(ImageTranslator(model.generator).eval(), data.x_test[:1], CPU)[0, 0]
    assert np.abs(np.asarray(Image.open(out), np.float64) - want).max() <= 1  # the served model, as trained
    bad = CliRunner().invoke(app, ["sample", "--model", "models:/i2i-test@champion", "--input", str(workdir / "no.png")])
    assert bad.exit_code == 2 and "no.png" in bad.output


@pytest.mark.slow
def test_cyclegan_translations_are_read_better_by_the_target_classifier(workdir, monkeypatch):
    # the step and the evaluation without the run lifecycle (pix2pix's test above goes through the stages)
    monkeypatch.chdir(workdir)
    from tasks.kinds.image2image import evaluate_translation

    cfg = validate({"data": {"source": "unpaired", "domains": "inverted", "max_train": 300},
                    "train": {"epochs": 1, "batch_size": 8, "lr": 0.001, "device": "cpu"},
                    "models": {"cyclegan": {"channels": 8, "d_channels": 8, "blocks": 1, "pool_size": 10}}})
    prepare(cfg.data, 0, workdir / "d-c")
    data = load_prepared(workdir / "d-c")
    labels = load_labels(workdir / "d-c")
    assert sorted(labels) == sorted(f"{s}_{p}" for s in "ab" for p in ("train", "val", "test"))
    assert len(data.x_train) == len(data.y_train) == len(labels["a_train"]) == len(labels["b_train"]) == 300
    t = _trainer("cyclegan", batch_size=8, lr=0.001, blocks=1, pool_size=10)
    scale = lambda x: torch.as_tensor(x, dtype=torch.float32) / 127.5 - 1  # noqa: E731
    t.fit(Split(scale(data.x_train), scale(data.y_train)), None)
    r = evaluate_translation(cfg, "cyclegan", t.model.eval(), data, workdir / "d-c", CPU).metrics
    assert r["target_accuracy"] > 0.6 and r["source_accuracy"] > 0.6  # the judges read their own domains
    assert r["class_agreement"] > r["untranslated_agreement"] + 0.2, r  # translation helps the B classifier
    assert r["class_agreement_ba"] > r["untranslated_agreement_ba"] + 0.2, r
    assert 0 < r["cycle_l1_a"] < 0.3 and 0 < r["cycle_l1_b"] < 0.3


def test_what_the_target_classifier_reads_is_counted_per_source_class():
    from tasks.kinds.image2image import by_class, judged

    class Reader(torch.nn.Module):  # reads class 1 when the image's mean is bright, else class 0
        def __init__(self):
            super().__init__()
            self.last = torch.nn.Linear(1, 2)
            with torch.no_grad():
                self.last.weight.copy_(torch.tensor([[-50.0], [50.0]])), self.last.bias.zero_()

        def forward(self, x):
            return self.last(x.flatten(1).mean(1, keepdim=True))

    dark, bright = np.zeros((1, 1, 4, 4), np.float32), np.full((1, 1, 4, 4), 255, np.float32)
    fake = np.concatenate([dark, dark, dark, bright, bright, bright, bright, bright])  # 3 of 4 zeros read right
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    stats = {"normalization": {"mean": [127.5], "std": [127.5]}}
    scores, confusion = judged(Reader(), stats, fake, fake.astype(np.uint8), labels, fake.astype(np.uint8),
                               labels, CPU)
    assert confusion.tolist() == [[3, 1], [0, 4]] and scores[0] == 7 / 8
    r = by_class(confusion, ["zero", "one"], "class_agreement")
    assert r["class_agreement_zero"] == 0.75 and r["class_agreement_one"] == 1.0
    assert r["class_agreement_se"] == pytest.approx(np.sqrt(7 / 8 * 1 / 8 / 8))
    assert "class_agreement_two" not in by_class(np.array([[2, 0, 0], [0, 1, 0], [0, 0, 0]]), ["zero", "one", "two"],
                                                 "class_agreement")  # no test images of that class: no share


def test_pix2pix_keeps_its_dropout_noise_when_translating_unless_told_not_to():
    a = torch.rand(2, 1, 32, 32) * 2 - 1
    noisy = create_model("pix2pix", input_shape=(1, 32, 32), num_classes=10, **TINY).eval()
    with torch.no_grad():  # eval mode, as evaluation and the served model run it: still two draws of G(x, z)
        assert not torch.equal(noisy(a), noisy(a))
    plain = create_model("pix2pix", input_shape=(1, 32, 32), num_classes=10, test_dropout=False, **TINY).eval()
    with torch.no_grad():
        assert torch.equal(plain(a), plain(a))
    assert noisy.train()(a).shape == a.shape


def test_the_source_classifier_reads_the_steps_images_in_its_own_units():
    from tasks.kinds.image2image import SourceClassifier

    torch.manual_seed(0)
    clf = create_model("simple_cnn", input_shape=(1, 32, 32), num_classes=10)
    f = SourceClassifier(clf, [127.5], [127.5], [40.0], [80.0])
    x = torch.rand(3, 1, 32, 32) * 2 - 1  # the step's units: raw = x * 127.5 + 127.5
    assert torch.allclose(f(x), clf.eval()((x * 127.5 + 127.5 - 40.0) / 80.0), atol=1e-5)
    assert not any(p.requires_grad for p in f.parameters())


@pytest.mark.parametrize("sides", ["both", "a"])
def test_the_semantic_loss_reads_the_translations_its_sides_name(sides):
    from models.image2image import SourceClassifier
    import torch.nn.functional as F

    torch.manual_seed(0)
    clf = create_model("simple_cnn", input_shape=(1, 32, 32), num_classes=10)
    step = _trainer("cyclegan", blocks=1, lambda_semantic=1.0, semantic_sides=sides).step
    step.semantic = f = SourceClassifier(clf, [127.5], [127.5], [127.5], [127.5])
    a, b, fake_b, fake_a = (torch.rand(4, 1, 32, 32) * 2 - 1 for _ in range(4))
    fake_a.requires_grad_(True)
    loss = step.semantic_loss(a, b, fake_b, fake_a)
    with torch.no_grad():
        of_a = F.cross_entropy(f(fake_b), f(a).argmax(1))
        of_b = F.cross_entropy(f(fake_a), f(b).argmax(1))
    assert torch.allclose(loss, of_a + of_b if sides == "both" else of_a)
    assert loss.requires_grad == (sides == "both")  # "a": F(b) is not read, whatever the classifier makes of b


def test_cycadas_semantic_loss_and_class_conditional_discriminators_train_the_generators(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    from tasks.tracking import client, metric_history

    cfg = validate({"data": {"source": "unpaired", "domains": "inverted", "max_train": 96},
                    "train": {"epochs": 1, "batch_size": 16, "lr": 0.001, "device": "cpu"},
                    "register": {"enabled": False},
                    "models": {"cyclegan": {"channels": 8, "d_channels": 8, "blocks": 1, "lambda_semantic": 1.0,
                                            "semantic_augment": True, "conditional": True}}})
    trained, r = _run(cfg, "cyclegan", workdir, "s")
    run = client().get_run(trained.run_id)
    assert "domain A's simple_cnn trained for the judgement (HandwritingAugment, 12 epochs" in \
        run.data.tags["nnlab.image2image.semantic"]
    assert run.data.tags["nnlab.image2image.conditional"] == "both domains' training labels"
    (_, ce), = metric_history(trained.run_id, "semantic_ce")
    assert 0 < ce < 10 and "class_agreement" in r
    judges = workdir / ".nnlab" / "judges"  # the semantic classifier apart from the one evaluation reads
    semantic = list(judges.glob("simple_cnn-*-a-handwriting.pt"))
    assert semantic and all(f.with_name(f.name.replace("-handwriting", "")).is_file() for f in semantic)
