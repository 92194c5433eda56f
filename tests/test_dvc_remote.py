"""`dvc push` to the default remote, then `git clone` + `dvc pull` elsewhere gives the same data and nothing to re-run."""
import hashlib
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, write_params
from test_dvc import sh

pytestmark = pytest.mark.slow
DVC = (sys.executable, "-m", "dvc")
GIT_COMMIT = ("git", "-c", "user.name=nnlab-test", "-c", "user.email=nnlab-test@localhost", "commit", "-q")
CACHED = ("data/processed", "data/augmented", "data/train/mlp", "metrics", "plots")  # what the remote holds


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file DVC's stages write, keyed by path relative to `root`."""
    files = (p for top in ("data", "metrics", "plots") for p in sorted((root / top).rglob("*")) if p.is_file())
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def pushed_and_pulled(tmp_path_factory):
    """A copy of the project as a user's checkout (the real .dvc/config), reproduced, committed and pushed to its
    default remote; then a `git clone` in another folder, pointed at that remote with --local config, and pulled."""
    top = tmp_path_factory.mktemp("dvc_remote")
    project, clone = top / "work/nnlab", top / "elsewhere/nnlab"
    (project / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        shutil.copy(ROOT / name, project / name)
    for folder in ("tasks", "models"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(project / "params.yaml", train={"epochs": 1}, models={"mlp": {"hidden": [16]}},
                 register={"name": f"dvc-remote-{uuid.uuid4().hex[:8]}"})
    sh("git", "init", "-q", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh(*GIT_COMMIT, "-m", "project", cwd=project)

    sh(*DVC, "repro", cwd=project)
    sh("git", "add", "dvc.lock", cwd=project)
    sh(*GIT_COMMIT, "-m", "dvc.lock", cwd=project)
    sh(*DVC, "push", cwd=project)  # to the default remote, untouched: ../../nnlab-dvc-remote from .dvc/
    remote = top / "work/nnlab-dvc-remote"

    clone.parent.mkdir()
    sh("git", "clone", "-q", str(project), str(clone), cwd=top)
    sh(*DVC, "remote", "modify", "--local", "local", "url", str(remote), cwd=clone)
    sh(*DVC, "pull", cwd=clone)
    return project, clone, remote


def test_default_remote_is_a_folder_next_to_the_checkout(pushed_and_pulled):
    project, clone, remote = pushed_and_pulled
    assert sh(*DVC, "remote", "default", cwd=project).stdout.strip() == "local"
    listed = sh(*DVC, "remote", "list", cwd=project).stdout.split()
    assert Path(listed[listed.index("local") + 1]) == remote  # the shipped url, resolved from .dvc/
    assert (remote / "files/md5").is_dir() and any((remote / "files/md5").rglob("*"))
    assert sh("git", "status", "--porcelain", cwd=clone).stdout == ""  # pulled data and config.local are git-ignored


def test_pull_in_a_clone_restores_the_cached_outputs_byte_for_byte(pushed_and_pulled):
    project, clone, _ = pushed_and_pulled
    before, after = hashes(project), hashes(clone)
    cached = {p: h for p, h in before.items() if p.startswith(CACHED)}
    assert "data/processed/manifest.json" in cached and "data/train/mlp/model.pt" in cached
    assert {p: after.get(p) for p in cached} == cached
    assert {p: before[p] for p in after} == after  # and nothing pulled differs from what was pushed
    status = sh(*DVC, "status", "prepare", "train@mlp", cwd=clone).stdout
    assert "up to date" in status


def test_clone_has_nothing_to_reproduce(pushed_and_pulled):
    project, clone, _ = pushed_and_pulled
    status = sh(*DVC, "status", cwd=clone).stdout
    assert "Data and pipelines are up to date." in status, status
    out = sh(*DVC, "repro", cwd=clone).stdout
    assert "Running stage" not in out and "up to date" in out
    assert hashes(clone) == hashes(project)
