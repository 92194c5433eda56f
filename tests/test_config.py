import subprocess
import sys
from pathlib import Path

import pytest

from tasks.config import ConfigError, apply_sets, flatten, load_config, select_models, validate

from conftest import ROOT


def error_of(*sets):
    with pytest.raises(ConfigError) as e:
        validate(apply_sets({}, list(sets)))
    return str(e.value)


def test_defaults_and_repository_params_validate():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.source == "digits"
    assert {"mlp", "simple_cnn", "vgg", "resnet", "inception", "mobilenet", "lstm", "gan_mlp"} <= set(cfg.models)
    assert cfg.runs() == ["mlp", "simple_cnn"]  # what make run trains: a dense net and a CNN
    assert cfg.models["mlp"]["arch"] == "mlp" and cfg.models["gru_forecast"]["arch"] == "gru"
    assert cfg.train_for("resnet").schedule == "cosine" and cfg.train_for("mlp").schedule == "none"


def test_misspelt_key_names_it_and_suggests():
    msg = error_of("train.optimzer=adam")
    assert "train.optimzer" in msg and "did you mean 'train.optimizer'" in msg


def test_misspelt_nested_key():
    msg = error_of("train.early_stopping.patiense=3")
    assert "train.early_stopping.patience" in msg


def test_early_stopping_watches_only_what_the_kind_measures():
    """val_bleu on a classifier would fail only after data preparation; validation refuses it up front, naming
    what that kind measures, and lets each kind watch its own measures."""
    es = ["train.early_stopping.enabled=true"]
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "params.yaml", [*es, "train.early_stopping.monitor=val_bleu"], ["simple_cnn"])
    assert "classification runs do not measure val_bleu" in str(e.value) and "val_accuracy" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "params.yaml", [*es, "train.early_stopping.monitor=val_accuracy",
                                           "data.source=synth_speech"], ["ctc_asr"])
    assert "val_cer, val_wer, val_exact_match" in str(e.value)
    for source, model, monitor in [("synth_speech", "ctc_asr", "val_wer"), ("dates", "seq2seq", "val_bleu"),
                                   ("digits", "mlp", "val_accuracy")]:
        load_config(ROOT / "params.yaml", [*es, f"train.early_stopping.monitor={monitor}", f"data.source={source}"],
                    [model])


def test_unknown_optimizer_suggests_adam():
    msg = error_of("train.optimizer=adamm")
    assert "train.optimizer" in msg and "'adamm'" in msg and "did you mean 'adam'" in msg
    assert "sgd" in msg and "adamw" in msg  # lists what is allowed


@pytest.mark.parametrize("sets, key", [
    (["train.lr=-0.1"], "train.lr"),
    (["train.lr=abc"], "train.lr"),
    (["models.mlp.dropout=1.5"], "models.mlp.dropout"),
    (["train.epochs=0"], "train.epochs"),
    (["data.val_fraction=0.9"], "data.val_fraction"),
    (["train.device=tpu"], "train.device"),
    (["models.simple_cnn.padding=full"], "models.simple_cnn.padding"),
    (["models.mlp.activation=relu6"], "models.mlp.activation"),
])
def test_bad_values_name_the_key(sets, key):
    msg = error_of(*sets)
    assert key in msg


def test_unknown_model_lists_known_ones():
    msg = error_of("models.mlpp.hidden=[8]")
    assert "models.mlpp" in msg and "did you mean 'mlp'" in msg and "simple_cnn" in msg


def test_unknown_model_option():
    msg = error_of("models.mlp.hiden=[8]")
    assert "models.mlp.hiden" in msg and "did you mean 'models.mlp.hidden'" in msg


def test_glorot_alias_and_set_parsing():
    cfg = validate(apply_sets({}, ["train.init=glorot_uniform", "models.mlp.hidden=[32, 16]", "train.lr=1e-2"]))
    assert cfg.train.init == "xavier_uniform"
    assert cfg.models["mlp"]["hidden"] == [32, 16]
    assert cfg.train.lr == 0.01


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_sets({}, ["train.lr"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_select_models_gives_defaults_to_unlisted_architecture():
    cfg = select_models(validate({"models": {"mlp": {"hidden": [8]}}}), ["mlp", "simple_cnn"])
    assert cfg.models["mlp"]["hidden"] == [8]
    assert cfg.models["simple_cnn"]["filters"] == [32, 64, 64]
    with pytest.raises(ConfigError, match="unknown model"):
        select_models(cfg, ["resnet999"])


def test_flatten_dotted_keys():
    assert flatten({"train": {"lr": 0.1, "es": {"p": 3}}, "seed": 0}) == {"train.lr": "0.1", "train.es.p": "3", "seed": "0"}


def nnlab(*args, cwd):
    exe = Path(sys.executable).parent / "nnlab"  # the installed console script, as a user runs it
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True)


def test_cli_exits_2_before_anything_runs(project):
    out = nnlab("run", "--set", "train.optimizer=adamm", cwd=project)
    assert out.returncode == 2, out.stderr
    assert "train.optimizer" in out.stderr and "adam" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (project / "data").exists() and not (project / "mlruns").exists() and not (project / ".nnlab").exists()


def test_cli_bad_params_file_and_models(project):
    assert nnlab("run", "--params", "missing.yaml", cwd=project).returncode == 2
    out = nnlab("run", "--models", "mlp,vgg99", cwd=project)
    assert out.returncode == 2 and "vgg99" in out.stderr
    for empty in (",", " , ", ""):  # no run named is an error, not "train everything"
        out = nnlab("run", "--models", empty, cwd=project)
        assert out.returncode == 2 and "names no run" in out.stderr, out.stderr
    assert not (project / "data").exists() and not (project / "mlruns").exists()


def test_a_damaged_prepared_file_is_named_with_its_fix(project):
    from tasks.data import DataError, load_prepared, prepare
    from tasks.config import DataConfig

    out = project / "data" / "processed"
    prepare(DataConfig(source="digits"), 0, out)
    load_prepared(out)  # intact: loads
    damaged = out / "train.npz"
    damaged.write_bytes(b"garbage" + damaged.read_bytes()[7:])  # it used to die in numpy: BadZipFile
    with pytest.raises(DataError, match=r"train.npz is damaged.*dvc repro prepare"):
        load_prepared(out)
    run = nnlab("stage", "train", "--model", "mlp", cwd=project)
    assert run.returncode == 2 and "train.npz is damaged" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (project / "mlruns").exists()  # refused before any MLflow run was opened
    prepare(DataConfig(source="digits"), 0, out)
    (out / "val.npz").unlink()
    with pytest.raises(DataError, match=r"val.npz missing"):
        load_prepared(out)


def test_a_run_in_training_is_locked_and_its_lock_dies_with_its_process(project):
    """The same run started twice used to resume the first's live checkpoint into one MLflow run (51 train_loss
    values for 30 steps, two logged models). Now the second refuses in one line, naming the first's PID; a killed
    holder leaves no stale lock."""
    import os
    import signal

    from tasks.config import load_config, params_hash
    from tasks.data import prepare
    from tasks.files import Busy, exclusive
    from tasks.stages import CHECKPOINTS, run_params

    cfg = load_config(project / "params.yaml", [])
    m = prepare(cfg.data, cfg.seed, project / "data" / "processed")
    phash = params_hash(run_params(cfg, "mlp"))
    lock = project / CHECKPOINTS / f"mlp-{params_hash([phash, m['data_hash'], None])}.lock"
    with exclusive(lock, "mlp"):  # as a training process holds it
        out = nnlab("stage", "train", "--model", "mlp", cwd=project)
    assert out.returncode == 1 and f"pid {os.getpid()}" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (project / "mlruns").exists()  # refused before a run was opened

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tasks.files import exclusive\n"
                               "with exclusive(sys.argv[1], 'x'):\n print('held', flush=True); time.sleep(60)",
                               str(lock)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Busy, match=f"pid {holder.pid}"):
        with exclusive(lock, "mlp"):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with exclusive(lock, "mlp"):  # kill -9 released it
        pass


TORCH_FREE_CHECK = """
import sys
from tasks.config import ConfigError, load_config, read_yaml, select_models
from tasks.sources import misfit
from tasks.sources import SOURCES
from tasks.search import expand  # a grid's cells, or a search's
from tasks.sweep import load_spec
from models.options import list_models
from pathlib import Path

cfg = load_config("params.yaml", [], None)
assert cfg.runs() and select_models(cfg, cfg.runs()).models
needs_path = ("text_csv", "pairs")
for arch in list_models():  # --models <arch> on a source it fits
    source = next(s for s in SOURCES if s not in needs_path and misfit(arch, s) is None)
    load_config("params.yaml", [f"data.source={source}"], [arch])
for sets, models, says in [(["train.early_stopping.enabled=true"], ["gan_mlp"], "a GAN has no held-out loss"),
                           ([], ["seq2seq"], "seq2seq makes translation runs"),
                           (["data.source=dates"], ["lstm"], "dates data makes translation runs")]:
    try:
        load_config("params.yaml", sets, models)
        raise AssertionError(f"{sets} {models}: not refused")
    except ConfigError as e:
        assert says in str(e), e
raw = read_yaml("params.yaml")
for sweep in sorted(Path("sweeps").glob("*.yaml")):  # every sweep cell is validated up front
    expand(load_spec(sweep, raw), raw)
from tasks.distributed import refusal  # the launch checks' (flows/launch.py ready_to_run): one process here
assert refusal(load_config("params.yaml", [], ["simple_cnn", "dcgan"])) is None
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision"})
assert not heavy, f"validation imported {heavy}"
print("torch-free")
"""


def test_validating_params_never_imports_torch():
    """A schema check, not a training run: every `nnlab` command validates params.yaml first, and importing torch
    and torchvision for it cost 4.5 s of a 5 s start-up."""
    out = subprocess.run([sys.executable, "-c", TORCH_FREE_CHECK], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "torch-free" in out.stdout, out.stderr
