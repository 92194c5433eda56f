import pytest
import torch

from models.registry import Deployed, UnknownModelError, count_parameters, create_model, get_spec, list_models, register_model

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
# models of their own kind (GANs, encoder-decoders, word LMs) have their own tests
CLASSIFIERS = [n for n in list_models() if get_spec(n).kind is None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_backward_shape_no_nan(name, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=7)
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_a_family_and_description(name):
    spec = get_spec(name)
    assert spec.family in ("mlp", "cnn", "rnn", "transformer", "gan", "transfer", "seq2seq", "speech")
    assert spec.description


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError) as e:
        create_model("simple_cnnn", input_shape=(1, 8, 8), num_classes=10)
    assert "did you mean 'simple_cnn'" in str(e.value) and "mlp" in str(e.value)


def test_duplicate_registration_raises():
    create_model("mlp", input_shape=(1, 8, 8), num_classes=10)  # models/mlp.py has attached its builder
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", family="mlp")(lambda **kw: None)


def test_registration_must_agree_with_the_catalogue():
    with pytest.raises(ValueError, match="not in models/options.py"):
        register_model("mlp2", family="mlp")
    with pytest.raises(ValueError, match="of family 'mlp'"):
        register_model("mlp", family="cnn")


def test_bad_option_raises():
    with pytest.raises(Exception, match="dropout"):
        create_model("mlp", input_shape=(1, 8, 8), num_classes=10, dropout=1.5)


def test_mlp_options_shape_the_network():
    m = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[32, 16], batch_norm=True,
                     activation="tanh", dropout=0.0)
    kinds = [type(l).__name__ for l in m.net]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    assert count_parameters(m) == 64 * 32 + 2 * 32 + 32 * 16 + 2 * 16 + 16 * 10 + 10


def test_simple_cnn_is_the_classic_stack():
    m = create_model("simple_cnn", input_shape=(1, 28, 28), num_classes=10, padding="valid")
    convs = [l for l in m.modules() if isinstance(l, torch.nn.Conv2d)]
    pools = [l for l in m.modules() if isinstance(l, torch.nn.MaxPool2d)]
    dense = [l for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64, 64] and len(pools) == 2
    assert [d.out_features for d in dense] == [64, 10]
    assert dense[0].in_features == 3 * 3 * 64  # 28 -> 26 -> 13 -> 11 -> 5 -> 3 with valid padding
    avg = create_model("simple_cnn", input_shape=(3, 32, 32), num_classes=10, pooling="avg", stride=1)
    assert any(isinstance(l, torch.nn.AvgPool2d) for l in avg.modules())


def test_simple_cnn_too_small_for_valid_padding():
    with pytest.raises(ValueError, match="too small"):
        create_model("simple_cnn", input_shape=(1, 8, 8), num_classes=10, padding="valid", kernel_size=5)


def test_deployed_normalises_raw_inputs_and_returns_probabilities():
    net = create_model("mlp", input_shape=(1, 8, 8), num_classes=3)
    d = Deployed(net, mean=[5.0], std=[2.0]).eval()
    x = torch.full((2, 1, 8, 8), 7.0)
    p = d(x)
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert torch.allclose(p, torch.softmax(net.eval()(torch.ones(2, 1, 8, 8)), 1))


def test_the_shipped_catalogue_is_current_and_answers_a_fresh_clone(tmp_path, monkeypatch):
    """`nnlab models` on a fresh clone (no .nnlab/cache) reads models/catalogue.json when its key matches the
    architectures' code; a stale one (an architecture changed without `make catalogue`) fails here."""
    import json

    from flows.admin import CATALOGUE, catalogue_key, compute_rows, model_rows

    shipped = json.loads(CATALOGUE.read_text())
    assert shipped["key"] == catalogue_key((1, 28, 28), 10), "models/*.py changed: run `make catalogue`"
    assert shipped["rows"] == compute_rows((1, 28, 28), 10), "models/catalogue.json is stale: run `make catalogue`"
    monkeypatch.chdir(tmp_path)  # no cache here
    monkeypatch.setattr("flows.admin.compute_rows", lambda *a: pytest.fail("computed instead of read"))
    assert model_rows((1, 28, 28), 10) == shipped["rows"]
