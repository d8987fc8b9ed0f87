"""Provenance of a result set (iclsim.results): the git state a run records leaves out the output folder the
run writes itself, and counts every other modified tracked file (issue 31)."""

import subprocess

from iclsim import results


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_dirty_leaves_out_the_output_folder_only(tmp_path):
    """A checkout whose committed figures/ a run rewrites is not dirty for that run; a modified tracked file
    elsewhere is. Planted bugs caught: the output folder counted (every `make reproduce` recorded dirty: true),
    the exclusion swallowing the rest of the tree."""
    root = tmp_path / "repo"
    (root / "figures").mkdir(parents=True)
    (root / "figures" / "fig2.csv").write_text("a\n1\n")
    (root / "code.py").write_text("x = 1\n")
    _git(root, "init", "-q")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert results.repo_state(root, root / "figures")["dirty"] is False
    (root / "figures" / "fig2.csv").write_text("a\n2\n")
    results.repo_state.cache_clear()
    assert results.repo_state(root, root / "figures")["dirty"] is False
    assert results.repo_state(root, None)["dirty"] is True
    (root / "code.py").write_text("x = 2\n")
    results.repo_state.cache_clear()
    assert results.repo_state(root, root / "figures")["dirty"] is True
    assert results.repo_state(root, tmp_path / "elsewhere")["dirty"] is True
