"""Every ```bash block of README.md and docs/ is followed as a newcomer would (tests/docs_commands.py): each
command parses against the real CLI and params schema, reads only files an earlier documented command wrote, and
names registered models that exist and are unambiguous. tests/test_docs_run.py runs them all, in order."""
from __future__ import annotations

from pathlib import Path

import pytest

import docs_commands as dc


def test_every_documented_command_follows_from_the_ones_before():
    cmds = dc.doc_commands()
    assert len(cmds) > 40 and {c.doc for c in cmds} >= {"README.md", "docs/models.md", "docs/sweeps.md"}
    state = dc.check(cmds)
    assert {"nnlab-classifier-digits", "nnlab-translator-dates", "nnlab-asr-synth_speech"} <= state.registered


def test_commands_that_need_more_than_a_clone_still_parse():
    for c in dc.doc_commands("shell"):
        if Path(c.argv[0]).name == "nnlab":
            dc.parse_cli(c)


@pytest.mark.parametrize("text, complaint", [
    ("nnlab run --models pix2pix --set data.source=paired\nnnlab run --models cyclegan --set data.source=unpaired\n"
     "nnlab sample --model models:/nnlab-image-translator@champion --input edges.png -o d.png",
     "ambiguous: nnlab-image-translator-paired, nnlab-image-translator-unpaired"),
    ("nnlab example-image edges.png\nnnlab sample --model models:/nnlab-generator@champion -n 4 -o s.png",
     "registered by no earlier documented command"),
    ("nnlab run --models ctc_asr --set data.source=synth_speech\nnnlab transcribe models:/nnlab-asr@champion r.wav",
     "reads 'r.wav', which no earlier documented command writes"),
    ("nnlab run --set train.optimizr=adam", "train.optimizr"),
    ("nnlab run --modles mlp", "No such option"),
    ("nnlab run --set train.optimizer=adamm\n# error: something else entirely", "the docs show the error"),
    ("pip install torch", "not a command a fresh clone has"),
])
def test_the_follower_finds_what_a_newcomer_would_meet(text, complaint):
    cmds = dc.commands_of("example.md", 1, text.splitlines())
    with pytest.raises(dc.DocError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        dc.check(cmds)
