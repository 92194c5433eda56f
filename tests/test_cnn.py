import pytest
import torch
from torch import nn

from models.analysis import count_macs, format_count, receptive_field
from models.cnn import PlainBlock
from models.registry import count_parameters, create_model
from tasks.config import DataConfig, TrainConfig
from tasks.data import load_prepared, prepare
from tasks.train import Trainer, seed_everything, to_device
from tasks.kinds.supervised import SupervisedStep

CNNS = ["vgg", "resnet", "inception", "mobilenet"]
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]
CPU = torch.device("cpu")


# ---------------------------------------------------------------- shapes and the features/head convention

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CNNS)
def test_builds_for_small_and_large_inputs(name, shape):
    torch.manual_seed(0)
    m = create_model(name, input_shape=shape, num_classes=10).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        out = m(x)
        assert out.shape == (3, 10) and torch.isfinite(out).all()
        feats = m.features(x)
    assert feats.dim() == 4 and min(feats.shape[-2:]) >= 1  # (B, C, h, w): still a map before the head
    assert torch.equal(m.head(feats), out)


@pytest.mark.parametrize("name", CNNS)
def test_creation_is_deterministic(name):
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        states.append(create_model(name, input_shape=(1, 28, 28), num_classes=10).state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


@pytest.mark.parametrize("name", CNNS + ["simple_cnn"])
def test_features_head_first_conv_convention(name):
    m = create_model(name, input_shape=(3, 32, 32), num_classes=10)
    assert isinstance(m.features, nn.Sequential) and isinstance(m.head, nn.Sequential)
    assert len(m.features) >= 3  # one child per block, not one flat layer list
    first = next(l for l in m.features[0].modules() if isinstance(l, nn.Conv2d))
    assert m.first_conv is first and first.in_channels == 3
    assert next(l for l in m.modules() if isinstance(l, nn.Conv2d)) is first
    assert not any(isinstance(l, nn.Conv2d) for l in m.head.modules())
    assert isinstance(m.head[-1], nn.Linear) and m.head[-1].out_features == 10
    assert m.first_conv.weight.shape[1] == 3  # (out, in, kh, kw): the first-layer kernels


@pytest.mark.parametrize("name", CNNS)
def test_small_inputs_stop_downsampling_at_two(name):
    m = create_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert m.features(torch.zeros(1, 1, 8, 8)).shape[-1] == 2  # 8 -> 4 -> 2, never 1 or 0


def test_vgg_options_shape_the_stack():
    m = create_model("vgg", input_shape=(1, 28, 28), num_classes=10, blocks=[16, 32], convs_per_block=3,
                     pooling="avg", batch_norm=False, dense=24)
    convs = [l for l in m.features.modules() if isinstance(l, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 3 + [32] * 3
    assert all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert not any(isinstance(l, nn.BatchNorm2d) for l in m.modules())
    assert sum(isinstance(l, nn.AvgPool2d) for l in m.modules()) == 1
    assert [l.out_features for l in m.head if isinstance(l, nn.Linear)] == [24, 10]
    strided = create_model("vgg", input_shape=(1, 28, 28), num_classes=10, pooling="stride")
    assert not any(isinstance(l, nn.MaxPool2d) for l in strided.modules())
    assert strided.features(torch.zeros(1, 1, 28, 28)).shape[-1] == 7
    with pytest.raises(ValueError, match="too small"):
        create_model("vgg", input_shape=(1, 8, 8), num_classes=10, padding="valid")


# ---------------------------------------------------------------- resnet

@pytest.mark.parametrize("depth", [7, 15, 4, 0])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=r"6n\+2.*8, 14, 20"):
        create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=depth)


def test_resnet_parameters_grow_with_depth_and_blocks_match_it():
    counts = []
    for depth in (8, 14, 20, 32):
        m = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=depth)
        convs = [l for l in m.modules() if isinstance(l, nn.Conv2d) and l.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth  # 3x3 convs + the linear head = the nominal depth
        counts.append(count_parameters(m))
    assert counts == sorted(counts) and len(set(counts)) == 4


def test_resnet_without_skip_has_no_shortcut():
    torch.manual_seed(0)
    skip = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=8).eval()
    torch.manual_seed(0)
    plain = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=8, skip=False).eval()
    assert all(type(b) is PlainBlock for stage in plain.features[1:] for b in stage)
    assert not any(l.kernel_size == (1, 1) for l in plain.modules() if isinstance(l, nn.Conv2d))  # no projections
    # same weights (the plain net is the residual net minus its 1x1 projections): the first block differs by + x
    missing = skip.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".downsample." in k for k in missing)
    x = torch.relu(torch.randn(2, 16, 28, 28))  # a stem output: non-negative
    b_skip, b_plain = skip.features[1][0], plain.features[1][0]
    with torch.no_grad():
        branch = b_skip.bn2(b_skip.conv2(torch.relu(b_skip.bn1(b_skip.conv1(x)))))
        assert torch.allclose(b_plain(x), torch.relu(branch), atol=1e-6)
        assert torch.allclose(b_skip(x), torch.relu(branch + x), atol=1e-6)


def test_silenced_residual_branches_pass_the_signal_only_with_skips():
    # every block's branch outputs 0 (bn2 scale and shift zeroed): the residual net still sees its input
    # through the shortcuts; the plain net outputs the same thing for every input
    outs = {}
    for skip in (True, False):
        torch.manual_seed(0)
        m = create_model("resnet", input_shape=(1, 8, 8), num_classes=10, depth=14, skip=skip).eval()
        with torch.no_grad():
            for b in m.modules():
                if hasattr(b, "bn2"):
                    b.bn2.weight.zero_()
                    b.bn2.bias.zero_()
            outs[skip] = m(torch.randn(4, 1, 8, 8))
    assert (outs[True] - outs[True][0]).abs().max() > 1e-3
    assert (outs[False] - outs[False][0]).abs().max() < 1e-6


# ---------------------------------------------------------------- inception, mobilenet

def test_inception_block_concatenates_four_branches():
    m = create_model("inception", input_shape=(1, 28, 28), num_classes=10, stages=[64, 128], blocks_per_stage=1)
    block = m.features[1][0]
    assert [type(b).__name__ for b in block.children()] == ["Conv2dNormActivation", "Sequential", "Sequential",
                                                              "Sequential"]
    out = block(torch.randn(2, 32, 28, 28))
    assert out.shape == (2, 64, 28, 28)  # 16 (1x1) + 32 (3x3) + 8 (5x5) + 8 (pool) channels
    kernels = sorted({l.kernel_size[0] for l in block.modules() if isinstance(l, nn.Conv2d)})
    assert kernels == [1, 3, 5]
    with pytest.raises(ValueError, match="multiple of 16"):
        create_model("inception", input_shape=(1, 28, 28), num_classes=10, stages=[40])


def test_mobilenet_width_mult_scales_parameters():
    p = {w: count_parameters(create_model("mobilenet", input_shape=(1, 28, 28), num_classes=10, width_mult=w))
         for w in (0.5, 1.0, 2.0)}
    assert p[0.5] < p[1.0] < p[2.0]
    assert p[2.0] > 3 * p[1.0]  # most weights are 1x1 convs: roughly quadratic in the width


def test_cnn_blocks_match_torchvisions_weights_and_outputs():
    """models/cnn.py writes torchvision's three blocks out (torchvision costs ~2 s to import): the same state_dict
    keys, the same seeded initial weights and the same outputs as torchvision's own."""
    from torchvision.models.mobilenetv2 import InvertedResidual as TvInverted
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.ops import Conv2dNormActivation as TvCNA

    from models import cnn

    down = lambda: nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))  # noqa: E731
    pairs = [(lambda: cnn.Conv2dNormActivation(3, 8, 3, stride=2), lambda: TvCNA(3, 8, 3, stride=2)),
             (lambda: cnn.Conv2dNormActivation(3, 8, 1, norm_layer=None, activation_layer=nn.Tanh, inplace=None),
              lambda: TvCNA(3, 8, 1, norm_layer=None, activation_layer=nn.Tanh, inplace=None)),
             (lambda: cnn.BasicBlock(8, 16, 2, down()), lambda: TvBasic(8, 16, 2, down())),
             (lambda: cnn.InvertedResidual(8, 8, 1, 6), lambda: TvInverted(8, 8, 1, 6)),
             (lambda: cnn.InvertedResidual(8, 16, 2, 1), lambda: TvInverted(8, 16, 2, 1))]
    x = torch.randn(2, 8, 8, 8)
    for ours, theirs in pairs:
        torch.manual_seed(0)
        a = ours()
        torch.manual_seed(0)
        b = theirs()
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        xin = x[:, :3] if isinstance(a, cnn.Conv2dNormActivation) else x
        assert torch.allclose(a.eval()(xin), b.eval()(xin))


def test_mobilenet_uses_depthwise_inverted_residuals():
    from models.cnn import InvertedResidual

    m = create_model("mobilenet", input_shape=(3, 32, 32), num_classes=10)
    blocks = [b for b in m.modules() if isinstance(b, InvertedResidual)]
    assert len(blocks) == 11 and sum(b.use_res_connect for b in blocks) == 6
    depthwise = [l for l in m.modules() if isinstance(l, nn.Conv2d) and l.groups > 1]
    assert len(depthwise) == 11 and all(l.groups == l.in_channels == l.out_channels for l in depthwise)
    assert all(l.out_channels % 8 == 0 for l in m.modules() if isinstance(l, nn.Conv2d) and l.in_channels > 3)


# ---------------------------------------------------------------- analysis

def test_count_macs_by_hand():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # (4, 8, 8): 4*64 outputs x 1*9 = 2304
        nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise: 4*64 outputs x 1*9 = 2304
        nn.Conv2d(4, 8, 1),  # pointwise: 8*64 outputs x 4 = 2048
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),  # (8, 4, 4): 8*16 outputs x (8/2)*9 = 4608
        nn.MaxPool2d(2),  # (8, 2, 2)
        nn.Flatten(), nn.Linear(32, 10),  # 320
    ).train()
    assert count_macs(net, (1, 8, 8)) == 2304 + 2304 + 2048 + 4608 + 320
    assert net.training  # mode put back


def test_count_macs_of_the_registry_models_are_plausible():
    m = create_model("simple_cnn", input_shape=(1, 28, 28), num_classes=10)
    # 28x28x32x9 + 14x14x64x32x9 + 7x7x64x64x9 + 3136x64 + 64x10
    assert count_macs(m, (1, 28, 28)) == 28 * 28 * 32 * 9 + 14 * 14 * 64 * 288 + 7 * 7 * 64 * 576 + 3136 * 64 + 640
    assert format_count(1234) == "1.2k" and format_count(3_400_000) == "3.4M" and format_count(12) == "12"


@pytest.mark.parametrize("name", ["mlp", "simple_cnn", "vgg", "resnet", "inception", "mobilenet", "dcgan", "gru"])
def test_count_macs_agrees_with_torch_flop_counter(name):
    """torch.utils.flop_counter as the oracle (MACs = FLOPs / 2) where it sees every multiply. nnlab keeps its own
    counter: FlopCounterMode misses CPU's fused kernels (an LSTM: 1,280 of 2,237,696 MACs; nn.TransformerEncoder's
    inference fast path: 50,816 of 2,086,528), which count_macs' module hooks count."""
    from torch.utils.flop_counter import FlopCounterMode

    m = create_model(name, input_shape=(1, 28, 28), num_classes=10).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.randn(1, 1, 28, 28))
    assert count_macs(m, (1, 28, 28)) == fc.get_total_flops() // 2


def test_classification_metrics_agree_with_scikit_learn():
    """scikit-learn's metrics as the oracle; ours stay torch-native (sklearn.metrics costs ~1.1 s of import in
    every run's process for three numbers). A class absent from both truth and prediction scores F1 0, as
    sklearn's labels=range(n), zero_division=0."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from tasks.kinds.supervised import classification_metrics

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 9, (300,), generator=g)  # class 9 never occurs
    logits = torch.randn(300, 10, generator=g) + 3 * torch.nn.functional.one_hot(y, 10) * (torch.rand(300, 1) > 0.4)
    metrics, cm = classification_metrics(logits, y, 10)
    pred = logits.argmax(1).numpy()
    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(y.numpy(), pred))
    assert (cm == confusion_matrix(y.numpy(), pred, labels=range(10))).all()
    assert metrics["test_macro_f1"] == pytest.approx(f1_score(y.numpy(), pred, labels=range(10), average="macro",
                                                              zero_division=0))


@pytest.mark.parametrize("layers, expected", [
    ([nn.Conv2d(1, 2, 3)], 3),
    ([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)], 5),
    ([nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3)], 8),
    ([nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=2, dilation=2)], 7),
    ([nn.Conv2d(1, 2, 3, stride=2), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3)], 7),
    ([nn.Conv2d(1, 2, 5, padding=2), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3)], 5),  # the head is ignored
])
def test_receptive_field_of_small_stacks(layers, expected):
    assert receptive_field(nn.Sequential(*layers), (1, 8, 8)) == expected


def test_receptive_field_none_without_convolutions_and_model_untouched():
    assert receptive_field(create_model("mlp", input_shape=(1, 8, 8), num_classes=10), (1, 8, 8)) is None
    m = create_model("resnet", input_shape=(1, 8, 8), num_classes=10).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    receptive_field(m, (1, 8, 8))
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_receptive_field_of_resnet_matches_the_formula(depth):
    # stem 3, then each 3x3 conv adds 2 x (product of the strides before it): 28n - 3 for 3 stages of n blocks.
    # Wider than the 28x28 input for n >= 2: the probe grows until the field fits.
    n = (depth - 2) // 6
    m = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=depth)
    assert receptive_field(m, (1, 28, 28)) == 28 * n - 3
    plain = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=depth, skip=False)
    assert receptive_field(plain, (1, 28, 28)) == 28 * n - 3  # shortcuts add paths, not reach


def test_receptive_field_follows_the_widest_inception_branch():
    m = create_model("inception", input_shape=(1, 28, 28), num_classes=10, stages=[32], blocks_per_stage=1)
    assert receptive_field(m, (1, 28, 28)) == 3 + 4  # stem 3x3, then the 5x5 branch (pool branch: 3 + 2)


def test_models_table_shows_a_field_wider_than_its_probe_as_a_lower_bound_and_caches_the_rows(tmp_path, monkeypatch):
    import models.registry
    from flows.admin import model_rows

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("flows.admin.CATALOGUE", tmp_path / "no-catalogue.json")  # computed, not the shipped table
    monkeypatch.setattr(models.registry, "list_models", lambda: ["simple_cnn", "wgan_gp", "seq2seq"])
    rows = {r[0]: r for r in model_rows((1, 28, 28), 10)}
    assert rows["simple_cnn"][4] == "18x18"  # measured: 3x3 conv, 2x2 pool, 3x3 conv, 2x2 pool
    assert rows["wgan_gp"][4] == "≥112x112"  # its critic's field outgrows the 4x-input probe: a bound, said so
    assert rows["seq2seq"][2] == "n/a" and "not for this input" in rows["seq2seq"][5]
    assert len(list((tmp_path / ".nnlab/cache").glob("models-*.json"))) == 1
    monkeypatch.setattr(models.registry, "create_model", None)  # the second listing builds nothing
    assert model_rows((1, 28, 28), 10) == list(rows.values())


# ---------------------------------------------------------------- they learn: real digits, the project's pipeline

DIGITS_RUNS = {  # architecture -> (options, epochs): ~1-2 s each on an idle 2-core CPU; test accuracy 0.95-0.99
    "simple_cnn": ({}, 8),
    "vgg": ({"blocks": [16, 32, 64]}, 5),
    "resnet": ({"depth": 8}, 5),
    "inception": ({"stages": [32, 64], "blocks_per_stage": 1}, 6),
    "mobilenet": ({"stages": [[16, 1, 1], [24, 2, 2], [32, 2, 2]], "last": 128}, 6),
}


@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    prepare(DataConfig(source="digits"), 0, out)
    data = load_prepared(out)
    mean, std = data.manifest["normalization"]["mean"], data.manifest["normalization"]["std"]
    splits = [to_device(x, y, mean, std, CPU, channels_last=True) for x, y in
              ((data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test))]
    return data.manifest, splits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DIGITS_RUNS))
def test_each_cnn_learns_digits(digits_splits, name):
    manifest, (train, val, test) = digits_splits
    options, epochs = DIGITS_RUNS[name]
    seed_everything(0)
    model = create_model(name, input_shape=tuple(manifest["input_shape"]), num_classes=manifest["num_classes"],
                         **options).to(memory_format=torch.channels_last)
    cfg = TrainConfig(epochs=epochs, device="cpu", diagnostics={"enabled": False})
    trainer = Trainer(model, cfg, 0, CPU, SupervisedStep(model, cfg, CPU))
    trainer.fit(train, val)
    acc = trainer.evaluate(test, "test")["test_accuracy"]
    print(f"{name}: digits test accuracy {acc:.4f} after {epochs} epochs")
    assert acc >= 0.90
