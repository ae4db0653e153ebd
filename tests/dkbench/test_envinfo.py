"""Provenance recorded with every row: the git revision says when the tree was not committed."""

import shutil
import subprocess

import pytest

from dkbench.measure.envinfo import git_sha

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


def test_git_sha_marks_uncommitted_changes(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    _git(tmp_path, "add", "kernel.py")
    _git(tmp_path, "commit", "-qm", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True, check=True).stdout.strip()
    clean = git_sha(tmp_path)
    assert clean and head.startswith(clean)
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert git_sha(tmp_path) == clean + "-dirty"


def test_git_sha_is_empty_outside_a_checkout(tmp_path):
    assert git_sha(tmp_path) == ""
