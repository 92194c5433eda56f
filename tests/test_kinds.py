"""Adding a kind of run is one Step, one Kind (and its row of validation rules) and a model (its catalogue row
and builder); the loop, the run lifecycle, the config, registration and the CLI take it as it comes. This file
is the worked example the README points to: an autoencoder ("reconstruction") trained, evaluated and registered
through the same stages as every model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.options import ModelSpec
from models.registry import Options, get_spec, register_model
from tasks.config import validate
from tasks.data import prepare
from tasks.kinds import (Evaluation, Kind, get_kind, kind_of, ranking, register_kind,
                         register_name)
from tasks.sources import Rules
from tasks.train import Step, build_optimizer, build_scheduler, to_device


# ---------------------------------------------------------------- 1. the model, in the catalogue with its kind

class AutoencoderOptions(Options):
    code: int = 8  # width of the bottleneck


class Autoencoder(nn.Module):
    def __init__(self, input_shape, code: int):
        super().__init__()
        n = int(torch.tensor(input_shape).prod())
        self.shape = tuple(input_shape)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(n, code), nn.ReLU(), nn.Linear(code, n))

    def forward(self, x):  # (B, *shape) -> (B, *shape)
        return self.net(x).view(-1, *self.shape)


def tiny_autoencoder(*, input_shape, num_classes, options: AutoencoderOptions) -> nn.Module:
    return Autoencoder(input_shape, options.code)


# its row of models/options.py MODELS (torch-free: what config validation reads)
SPEC = ModelSpec("tiny_autoencoder", "mlp", __name__, AutoencoderOptions,
                 "Dense autoencoder (the worked example of a new kind).", kind="reconstruction")


# ---------------------------------------------------------------- 2. the step: what one batch does

class ReconstructionStep(Step):
    def __init__(self, model, cfg, device):
        self.model, self.device = model, device
        self.opt = build_optimizer(model.parameters(), cfg)
        self.sched = build_scheduler(self.opt, cfg)

    def begin_epoch(self, batches):
        self.losses = torch.zeros(batches, device=self.device)

    def __call__(self, i, step, xb, yb):
        loss = F.mse_loss(self.model(xb), xb)  # labels unused: the input is the target
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.losses[i] = loss.detach()

    def end_epoch(self, epoch):
        return {"train_loss": float(self.losses.mean())}

    @torch.no_grad()
    def evaluate(self, data, prefix="val"):
        self.model.eval()
        return {f"{prefix}_loss": float(F.mse_loss(self.model(data.x), data.x))}

    def lrs(self):
        return {"lr": self.opt.param_groups[0]["lr"]}

    def schedule(self):
        if self.sched is not None:
            self.sched.step()

    def state_dict(self):
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, s):
        self.opt.load_state_dict(s["optimizer"])


# ---------------------------------------------------------------- 3. the kind: served model, evaluation, metric

class Reconstruction(Kind):
    name, metric = "reconstruction", "test_reconstruction_mse"
    lower_is_better = ("test_reconstruction_mse",)

    def step(self, model, cfg, seed, device):
        return ReconstructionStep(model, cfg, device)

    def served(self, job):
        net = copy.deepcopy(job.model).cpu()
        return net, job.data.x_test[:4].astype("float32"), {"kind": "autoencoder"}, None

    def evaluate(self, cfg, name, model, final, data, data_dir, device):
        import matplotlib.pyplot as plt

        norm = final["normalization"]
        x = to_device(data.x_test, data.y_test, norm["mean"], norm["std"], device, channels_last=False).x
        with torch.no_grad():
            mse = float(F.mse_loss(model.eval()(x), x))
        fig, ax = plt.subplots()
        ax.imshow(torch.cat([x[0, 0], model(x[:1])[0, 0]], 1).detach().cpu().numpy(), cmap="gray")
        return Evaluation({"test_reconstruction_mse": mse}, fig, "plots/reconstruction.png")


# ---------------------------------------------------------------- the shared machinery takes it as it is

@pytest.fixture
def reconstruction(monkeypatch):
    """The model's row in models/options.py MODELS and the kind's in tasks/sources.py RULES (nothing refused), then
    what their modules do on import: attach the builder, register the kind. Undone after the test, so the
    registry-wide tests elsewhere see only the shipped models."""
    from models import options, registry
    from tasks import kinds, sources

    monkeypatch.setitem(options.MODELS, SPEC.name, SPEC)
    monkeypatch.setitem(sources.RULES, "reconstruction", Rules())
    register_model("tiny_autoencoder", family="mlp")(tiny_autoencoder)
    register_kind(Reconstruction)
    yield
    registry._BUILDERS.pop("tiny_autoencoder")
    kinds._KINDS.pop("reconstruction")


def test_a_new_kind_runs_through_the_shared_stages_and_registry(reconstruction, tmp_path, monkeypatch):
    from tasks.stages import evaluate_stage, register_stage, train_stage
    from tasks.tracking import client

    monkeypatch.chdir(tmp_path)
    cfg = validate({"data": {"source": "digits"}, "train": {"epochs": 3, "device": "cpu", "lr": 3e-3},
                    "register": {"name": "autoencoder-example"}, "models": {"tiny_autoencoder": {"code": 16}}})
    assert kind_of("tiny_autoencoder", "digits") is get_kind("reconstruction")
    assert ranking(cfg) == {"metric": "test_reconstruction_mse", "lower_is_better": True}
    assert register_name(cfg) == "autoencoder-example" and get_spec("tiny_autoencoder").kind == "reconstruction"
    prepare(cfg.data, 0, "d")
    trained = train_stage(cfg, "tiny_autoencoder", "d", "out")
    result = evaluate_stage(cfg, "tiny_autoencoder", "d", "out", "m.json", "p")
    losses = [h["val_loss"] for h in torch.load("out/model.pt", weights_only=False)["history"]]
    assert losses[-1] < losses[0] and 0 < result["test_reconstruction_mse"] < losses[0]

    run = client().get_run(trained.run_id)
    assert run.data.tags["nnlab.model"] == "tiny_autoencoder" and run.info.status == "FINISHED"
    assert "test_reconstruction_mse" in run.data.metrics and (tmp_path / "p" / "test.png").stat().st_size > 0
    first = register_stage(cfg, [result], None)
    worse = register_stage(cfg, [{**result, "test_reconstruction_mse": result["test_reconstruction_mse"] + 1}], None)
    assert (first["alias"], worse["alias"]) == ("champion", "challenger")  # lower wins, as the kind says

    # a run that failed a health check is never champion: not when it scores better, not when it is the first
    sick = {**result, "test_reconstruction_mse": 0.0, "health": ["exploding"]}
    better_but_sick = register_stage(cfg, [sick], None)
    assert better_but_sick["alias"] == "challenger" and "exploding" in better_but_sick["decision"]
    fresh = cfg.model_copy(update={"register": cfg.register.model_copy(update={"name": "autoencoder-sick"})})
    assert register_stage(fresh, [{**sick, "health": ["mode_collapse", "dead_units"]}], None)["alias"] == "challenger"
    tags = client().get_model_version("autoencoder-sick", 1).tags
    assert tags["nnlab.not_champion"] == "mode_collapse"
    # beside a healthy run, the healthy one is registered even when the sick one scores better
    picked = register_stage(fresh, [sick, {**result, "health": ["dead_units"]}], None)
    assert picked["alias"] == "champion" and picked["test_reconstruction_mse"] == result["test_reconstruction_mse"]


def test_settings_a_kind_cannot_honour_are_refused():
    from tasks.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.early_stopping.enabled: a GAN has no held-out loss"):
        validate({"data": {"source": "ring8"}, "train": {"early_stopping": {"enabled": True}},
                  "models": {"gan_mlp": {}}})
    with pytest.raises(ConfigError, match=r"augment.enabled: .*models.dcgan is a generation run"):
        validate({"augment": {"enabled": True}, "models": {"dcgan": {}}})
    validate({"train": {"early_stopping": {"enabled": True}}, "augment": {"enabled": True}, "models": {"mlp": {}}})
