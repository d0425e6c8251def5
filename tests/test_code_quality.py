"""The type check and the linter, configured in setup.cfg and pyproject.toml, run with the tests."""

import subprocess
import sys

from conftest import ROOT


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_types_check():
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_is_clean():
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr
