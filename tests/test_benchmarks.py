"""The benchmark script runs end to end in its smoke-test mode. Timings and ratios are not checked: they
depend on the machine and its load."""
import json
import re
import subprocess
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loop_overhead.py"


def bench(tmp_path, *args) -> tuple[str, dict]:
    out = tmp_path / "results.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_quick_loop_and_precision_print_ratios(tmp_path):
    # one torch thread, like the rest of the suite (conftest.py): the smoke test measures nothing, and 2 threads
    # on a busy 2-core machine made it take a minute instead of seconds
    stdout, results = bench(tmp_path, "--models", "mlp", "--dataset", "digits", "--sections", "loop,precision",
                            "--threads", "1")
    assert "ratio ours/baseline" in stdout
    assert re.search(r"mlp\s*│\s*[\d,]+\s*│\s*[\d,]+\s*│\s*\d+\.\d{3}", stdout), stdout  # model, 2 x samples/s, ratio
    for mode in ("epoch", "train"):
        assert isinstance(results["loop"][mode]["models"]["mlp"]["ours"]["ratio"], float)
    assert "fp32 contiguous" in results["precision"]["models"]["mlp"]
    assert "fixed" not in results  # --sections is honoured
    assert results["machine"]["torch_threads"] == 1  # and --threads
