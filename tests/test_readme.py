"""The figures in README.md and docs/ come from params.yaml's settings: every `nnlab run` there names entries of
`models` and overrides nothing but what data to use (`data.*`), how many epochs, and augmentation on or off.
A block of flag examples says so in its first line and is exempt."""
import re
import shlex

import pytest

from conftest import ROOT
from tasks.config import load_config, select_models

ALLOWED = re.compile(r"data\.[a-z_]+|train\.epochs|augment\.enabled")


def run_commands() -> list[tuple[str, str]]:
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            if block.lstrip().startswith("# examples of flags"):
                continue
            for cmd in block.replace("\\\n", " ").splitlines():
                cmd = cmd.split("  #")[0].strip()
                if cmd.startswith("nnlab run"):
                    out.append((doc.name, cmd))
    return out


COMMANDS = run_commands()


def test_the_docs_hold_figure_commands():
    assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("doc, cmd", COMMANDS, ids=[c for _, c in COMMANDS])
def test_figure_commands_are_the_defaults_plus_the_data(doc, cmd):
    args = shlex.split(cmd)[2:]
    sets, models = [], None
    for flag, value in zip(args[::2], args[1::2]):
        if flag in ("--set", "-s"):
            sets.append(value)
        elif flag in ("--models", "-m"):
            models = value.split(",")
        else:
            pytest.fail(f"{doc}: {cmd}: flag {flag} is neither --models nor --set")
    extra = [s for s in sets if not ALLOWED.fullmatch(s.split("=")[0])]
    assert not extra, f"{doc}: {cmd}: settings that belong in params.yaml: {extra}"
    cfg = load_config(ROOT / "params.yaml", sets, models)  # valid for the runs it trains
    unknown = [m for m in models or [] if m not in load_config(ROOT / "params.yaml").models]
    assert not unknown, f"{doc}: {cmd}: {unknown} not in params.yaml's models"
    select_models(cfg, models or cfg.runs())
