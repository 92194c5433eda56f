"""Faults a user meets at the edges of `nnlab run` and `nnlab sweep`: registration switched off in a sweep, a
data setting its source does not read, SIGTERM mid-training, and bad data named before anything boots."""
import os
import signal
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, group_left, write_params
from tasks.config import DataConfig, read_yaml
from tasks.sources import unreadable
from tasks.sweep import expand, fold_sets, load_spec, registration_off

NNLAB = str(Path(sys.executable).parent / "nnlab")
TINY = {"models.mlp.hidden": [16], "models.mlp.dropout": 0.0}


def nnlab(cwd: Path, uri: str, *args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([NNLAB, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, **env})


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def children(uri: str, parent: str) -> list:
    c = client(uri)
    exp = c.get_run(parent).info.experiment_id
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=100)


# ---------------------------------------------------------------- 1. a sweep with registration off registers nothing

@pytest.mark.slow
def test_sweep_with_fixed_register_off_registers_nothing(tmp_path):
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "regoff", "model": "mlp", "workers": 2, "grid": {"train.lr": [0.001, 0.01]},
        "fixed": {"train.epochs": 1, **TINY, "register": {"enabled": False}}}))
    out = nnlab(tmp_path, uri, "sweep", "s.yaml")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "not registered: registration is off (register.enabled: false)" in out.stdout, out.stdout[-2000:]
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    assert sorted(r.info.status for r in children(uri, parent)) == ["FINISHED", "FINISHED"]
    assert client(uri).search_registered_models() == []  # before the fix: the best cell became champion


@pytest.mark.parametrize("sets, why", [
    ([], None),
    (["register.enabled=false"], "registration is off (register.enabled: false)"),
    (["sweep.register=false"], "registration is off (sweep.register: false)"),
])
def test_either_register_setting_turns_the_sweeps_registration_off(sets, why):
    raw = read_yaml(ROOT / "params.yaml")
    spec = load_spec(None, {"sweep": {"name": "t", "model": "mlp", "grid": {"train.lr": [0.1, 0.2]}}})
    spec = spec.model_validate(fold_sets(spec.model_dump(), sets))
    assert registration_off(spec, expand(spec, raw)) == why


def test_a_mapping_in_fixed_sets_its_keys_and_keeps_the_rest_of_the_section():
    raw = read_yaml(ROOT / "params.yaml")
    raw["train"]["batch_size"] = 32
    spec = load_spec(None, {"sweep": {"name": "t", "model": "mlp", "grid": {"seed": [0]},
                                      "fixed": {"train": {"epochs": 1}, "register": {"enabled": False}}}})
    cfg = expand(spec, raw)[0].cfg
    assert cfg.train.epochs == 1 and cfg.train.batch_size == 32  # params.yaml's batch size kept, not the default
    assert cfg.register.enabled is False


# ---------------------------------------------------------------- 2. a data setting its source does not read

def test_data_path_for_a_source_that_reads_none_is_an_error(tmp_path):
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    out = nnlab(tmp_path, uri, "run", "--set", "data.path=/nonexistent", "--set", "train.epochs=1", timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    line = out.stderr.strip()
    assert "\n" not in line and "data.path" in line and "digits reads no path" in line
    assert "text_csv" in line and "pairs" in line and "image_folder" in line  # the sources that do
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "p", "model": "mlp", "grid": {"train.lr": [0.1]}}))
    swept = nnlab(tmp_path, uri, "sweep", "s.yaml", "--set", "data.path=/nonexistent", timeout=120)
    assert swept.returncode == 2 and "digits reads no path" in swept.stderr, swept.stderr[-2000:]
    assert not (tmp_path / "store").exists() and not (tmp_path / ".nnlab").exists()  # no MLflow run, nothing run


# ---------------------------------------------------------------- 3. SIGTERM ends a run or a sweep as Ctrl-C does

def start(cwd: Path, uri: str, *args: str) -> tuple[subprocess.Popen, Path]:
    client(uri).search_experiments()  # the store exists (migrated) before the CLI and this test both open it
    log = cwd / "out.txt"
    p = subprocess.Popen([NNLAB, *args], cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri}, start_new_session=True)
    return p, log


def training_runs(uri: str, p: subprocess.Popen, log: Path, n: int, timeout: float = 300) -> list:
    """Wait until `n` runs are RUNNING with an epoch logged (mid-training); those runs."""
    c, deadline = client(uri), time.time() + timeout
    while time.time() < deadline:
        assert p.poll() is None, log.read_text()[-3000:]
        exps = [e.experiment_id for e in c.search_experiments()]
        runs = [r for r in c.search_runs(exps, "attributes.status = 'RUNNING'") if "train_loss" in r.data.metrics]
        if len(runs) >= n:
            return runs
        time.sleep(0.3)
    raise AssertionError(f"no training after {timeout} s: {log.read_text()[-3000:]}")


def stopped(p: subprocess.Popen, log: Path, sig_to_group: bool) -> str:
    (os.killpg if sig_to_group else os.kill)(p.pid, signal.SIGTERM)
    sent = time.monotonic()
    p.wait(timeout=60)
    said = log.read_text()
    assert p.returncode == 143 and time.monotonic() - sent < 30, said[-3000:]
    assert "Traceback" not in said, said[-3000:]
    assert not group_left(p.pid, 10), f"left behind: {group_left(p.pid, 0)}"  # no worker, fork server or tracker
    return said


@pytest.mark.slow
def test_sigterm_to_a_run_marks_it_killed_and_exits_143(tmp_path):
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p, log = start(tmp_path, uri, "run", "--models", "mlp", "--set", "train.epochs=500", "--set",
                   "register.enabled=false", "--set", "models.mlp.hidden=[16]")
    run = training_runs(uri, p, log, 1)[0]
    said = stopped(p, log, sig_to_group=False)
    assert f"terminated (SIGTERM): mlp's MLflow run {run.info.run_id} is marked KILLED; the same command " \
           "resumes it" in said, said[-3000:]
    assert client(uri).get_run(run.info.run_id).info.status == "KILLED"


@pytest.fixture
def ctrl_c():
    """SIGINT at Python's default handler, as in a terminal (a suite started in the background of a
    non-interactive shell inherits it ignored, and no Ctrl-C would arrive)."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def test_a_signal_inside_a_held_block_waits_for_its_end_then_meets_its_handler(ctrl_c):
    from tasks.interrupts import signals_held

    ran = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python would have run the handler here
            ran.append("after the signal")
    assert ran == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    with signals_held():
        pass  # nothing pending: nothing raised


def test_ctrl_c_in_the_middle_of_a_store_write_leaves_the_store_whole_and_unlocked(tmp_path, monkeypatch, ctrl_c):
    """A Ctrl-C that lands inside a write (here: as the metrics are inserted) waits for it to commit: the store is
    never left locked by a transaction cut in half, so the run can be marked KILLED at once, and the batch is
    whole."""
    import sqlite3

    from sqlalchemy import event

    from tasks.tracking import Run, prepare_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepare_store("held")
    run = Run.start("held", "w", {}, {})
    engine, sent = run.c._inner._tracking_client.store.engine, []

    def ctrl_c_once(conn, cursor, statement, *rest):
        if "INSERT INTO metrics" in statement and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(engine, "before_cursor_execute", ctrl_c_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.log_metrics({"a": 1.0, "b": 2.0})
    finally:
        event.remove(engine, "before_cursor_execute", ctrl_c_once)
    assert sent
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=0.5)
    db.execute("BEGIN IMMEDIATE")  # a writer gets the store at once
    db.rollback()
    assert db.execute("select key, value from metrics order by key").fetchall() == [("a", 1.0), ("b", 2.0)]
    assert run.mark_interrupted("test", patience=1.0)
    assert client(os.environ["MLFLOW_TRACKING_URI"]).get_run(run.run_id).info.status == "KILLED"


def long_sweep(tmp_path: Path, name: str) -> tuple[str, subprocess.Popen, Path]:
    """A 2-cell sweep of 500-epoch cells on 2 workers, started in the background: (store URI, process, its log)."""
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": name, "model": "mlp", "workers": 2, "grid": {"train.lr": [0.001, 0.002]},
        "fixed": {"train.epochs": 500, **TINY, "register.enabled": False}}))
    return (uri, *start(tmp_path, uri, "sweep", "s.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("sig_to_group", [False, True], ids=["kill-pid", "kill-group"])
def test_sigterm_to_a_sweep_stops_its_workers_marks_it_killed_and_exits_143(tmp_path, sig_to_group):
    """`kill PID` (docker stop, Kubernetes) or SIGTERM to the whole process group (Slurm's scancel, systemd)."""
    uri, p, log = long_sweep(tmp_path, "term")
    parent = training_runs(uri, p, log, 2)[0].data.tags["mlflow.parentRunId"]
    said = stopped(p, log, sig_to_group)
    assert f"terminated (SIGTERM): sweep parent run {parent} is marked KILLED; finish it with: " \
           f"nnlab sweep --resume {parent}" in said, said[-3000:]
    assert client(uri).get_run(parent).info.status == "KILLED"
    assert [r.info.status for r in children(uri, parent)] == ["KILLED", "KILLED"]


@pytest.mark.slow
def test_kill_9_of_a_sweep_leaves_no_worker_and_its_cells_are_marked_killed(tmp_path):
    """The sweep process gone without a word (kill -9, out of memory): its workers notice, mark the runs they were
    training KILLED and exit; the fork server and the temporary Prefect server go too."""
    uri, p, log = long_sweep(tmp_path, "kill9")
    cells = {r.info.run_id for r in training_runs(uri, p, log, 2)}
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert not group_left(p.pid, 30), f"left behind: {group_left(p.pid, 0)}"
    assert {client(uri).get_run(r).info.status for r in cells} == {"KILLED"}


# ---------------------------------------------------------------- 4. bad data named before anything boots

def written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def pairs_file(path: Path, bad: bool = True) -> Path:
    lines = [f"hallo {i}\thello {i}" for i in range(30)]
    if bad:
        lines.insert(25, "eine Zeile ohne Tabulator")  # line 26
    return written(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("source, model, make, needles", [
    ("text_csv", "text_lstm", lambda d: written(d / "reviews.csv", "text,sentiment\ngood,1\nbad,0\n"),
     ["data.label_column: no column 'label'", "reviews.csv", "its columns are: text, sentiment"]),
    ("pairs", "seq2seq", lambda d: pairs_file(d / "deu.txt"), ["deu.txt, line 26: 1 column(s)", "tab-separated"]),
], ids=["csv-without-label-column", "pairs-line-without-tab"])
def test_bad_data_is_named_before_the_server_boots(tmp_path, source, model, make, needles):
    write_params(tmp_path / "params.yaml")
    path = make(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # a fresh clone: it would boot its own
    began = time.monotonic()
    out = subprocess.run([NNLAB, "run", "--models", model, "--set", f"data.source={source}", "--set",
                          f"data.path={path}"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                              "PREFECT_HOME": str(tmp_path / "prefect-home")})
    took = time.monotonic() - began
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert all(n in out.stderr for n in needles), out.stderr
    assert "Prefect server" not in out.stderr and out.stdout == ""  # no server booted, no flow run, no MLflow line
    assert took < 12, f"{took:.1f} s"  # the server's boot alone takes longer
    assert not (tmp_path / "store").exists() and not (tmp_path / ".nnlab").exists()  # no store, no working folder


def wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(struct.pack("<800h", *([0] * 800)))
    return path


def recordings(root: Path, bad: bool) -> Path:
    root.mkdir()
    for i in range(3):
        wav(root / f"{i}_anna_{i}.wav")
    if bad:
        written(root / "4_anna_4.wav", "not audio at all")
    return root


def images(root: Path, bad: bool) -> Path:
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(root / c / "a.png")
        Image.new("L", (8, 8)).save(root / c / "b.jpg", format="PNG")  # a PNG named .jpg: PIL reads it by content
    if bad:
        written(root / "dog" / "c.png", "a text file named .png")
    return root


@pytest.mark.parametrize("source, make, needle", [
    ("speech", lambda d, bad: recordings(d / "rec", bad), "4_anna_4.wav: not a readable recording"),
    ("image_folder", lambda d, bad: images(d / "img", bad), "cannot read image"),
    ("charlm", lambda d, bad: written(d / "c.txt", " \n" if bad else "some text"), "c.txt is empty"),
    ("pairs", lambda d, bad: pairs_file(d / "p.tsv", bad), "p.tsv, line 26: 1 column(s)"),
    ("text_csv", lambda d, bad: written(d / "t.tsv", "" if bad else "text\tlabel\nx\t1\n"), "no column 'text' in"),
])
def test_each_look_names_the_bad_file_and_passes_a_good_one(tmp_path, source, make, needle):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    assert unreadable(DataConfig(source=source, path=str(make(good, False)))) is None
    why = unreadable(DataConfig(source=source, path=str(make(bad, True))))
    assert why is not None and needle in why and str(bad) in why, why


def _cells_runs(uri: str, parent: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in children(uri, parent):
        out.setdefault(r.data.tags["nnlab.sweep_cell"], []).append(r)
    return out


@pytest.mark.slow
def test_a_failing_cell_is_retried_recorded_and_rerun_alone_and_fail_fast_stops_launching(tmp_path):
    """A planted always-failing cell (train.device cuda:7: no such device here): with `retries: 1` it is tried
    twice, each try a FAILED child run with its reason, while every other cell finishes; `--rerun-failed` runs
    exactly the failed cells again and touches no finished one; `--fail-fast` on one worker launches nothing
    after the first failure and says so."""
    import torch

    if torch.cuda.device_count() > 7:
        pytest.skip("a machine with an eighth GPU has no failing device to plant")
    write_params(tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "faults", "model": "mlp", "workers": 2, "retries": 1,
        "grid": {"train.device": ["cuda:7", "cpu"]},
        "fixed": {"train.epochs": 2, **TINY, "register.enabled": False}}))
    out = nnlab(tmp_path, uri, "sweep", "s.yaml")
    assert out.returncode == 1 and "1 not finished" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    runs = _cells_runs(uri, parent)
    bad, good = ["device=cuda:7"], ["device=cpu"]
    assert sorted(runs) == sorted(bad + good)
    for cell in bad:  # the first try and its retry
        assert [r.info.status for r in runs[cell]] == ["FAILED", "FAILED"]
        assert all("cuda:7" in r.data.tags["nnlab.error"] for r in runs[cell])
    finished = {cell: runs[cell][0].info.run_id for cell in good}
    assert all(len(runs[c]) == 1 and runs[c][0].info.status == "FINISHED" for c in good)

    out = nnlab(tmp_path, uri, "sweep", "--rerun-failed", parent, "--set", "sweep.retries=0")
    assert out.returncode == 1 and "ran 1 now" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    runs = _cells_runs(uri, parent)
    assert [len(runs[c]) for c in bad] == [3]  # exactly the failed cell ran again (once: no retry)
    assert {c: [r.info.run_id for r in runs[c]] for c in good} == {c: [i] for c, i in finished.items()}

    out = nnlab(tmp_path, uri, "sweep", "s.yaml", "--fail-fast", "--workers", "1", "--set", "sweep.retries=0")
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    said = " ".join(out.stdout.split())
    assert "ran 1 now" in said and "fail-fast: a cell failed, 1 not launched (nnlab sweep --resume runs them)" in said
    parent = out.stdout.split("sweep parent run ")[1].split(":")[0]
    assert list(_cells_runs(uri, parent)) == [bad[0]]


def test_rerun_failed_takes_no_sweep_file(tmp_path):
    write_params(tmp_path / "params.yaml")
    out = nnlab(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "sweep", "sweeps/optimizers.yaml", "--rerun-failed",
                "abc")
    assert out.returncode == 2 and "--rerun-failed PARENT takes neither --resume nor a sweep file" in out.stderr
