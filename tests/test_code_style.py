"""The Model Zoo's code-style checks on every tracked file: black, isort and flake8 with the Zoo's settings
(setup.cfg, pyproject.toml) and the hooks of its .pre-commit-config.yaml (run from the pre-commit-hooks package,
so nothing is fetched from the network). Fix with: black . && isort . (and the hooks' --autofix where offered)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [name for name in out if (ROOT / name).is_file()]


def text_files() -> list[str]:
    """Tracked files that are text (no NUL byte in the first 8 kB, git's own test), as pre-commit's types: [text]."""
    return [name for name in tracked() if b"\0" not in (ROOT / name).read_bytes()[:8192]]


def executables() -> list[str]:
    """Tracked text files whose git mode is executable: what pre-commit passes to check-executables-have-shebangs."""
    staged = subprocess.run(["git", "ls-files", "--stage"], cwd=ROOT, capture_output=True, text=True, check=True)
    modes = dict(line.split("\t")[::-1] for line in staged.stdout.splitlines())
    return [name for name in text_files() if modes.get(name, "").split(" ")[0] == "100755"]


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def python_files() -> list[str]:
    files = tracked("*.py")
    assert "scripts/networks.py" in files and "tests/test_code_style.py" in files
    return files


def test_black(python_files):
    result = run(sys.executable, "-m", "black", "--check", "--quiet", *python_files)
    assert result.returncode == 0, "would reformat: " + result.stderr + " (run: black .)"


def test_isort(python_files):
    result = run(sys.executable, "-m", "isort", "--check-only", "--quiet", *python_files)
    assert result.returncode == 0, result.stdout + result.stderr + "\nrun: isort ."


def test_flake8(python_files):
    result = run(sys.executable, "-m", "flake8", *python_files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "hook, args, kinds",
    [
        ("end-of-file-fixer", [], "text"),
        ("trailing-whitespace-fixer", [], "text"),
        ("mixed-line-ending", ["--fix=no"], "text"),
        ("check-yaml", [], "*.yaml"),
        ("check-toml", [], "*.toml"),
        ("check-docstring-first", [], "*.py"),
        ("check-executables-have-shebangs", [], "executable"),
        ("check-case-conflict", [], "all"),
        ("detect-private-key", [], "text"),
        ("check-added-large-files", ["--maxkb=1024", "--enforce-all"], "all"),
        ("pretty-format-json", ["--no-sort-keys", "--indent=4"], "*.json"),
    ],
)
def test_pre_commit_hook(hook, args, kinds, tmp_path):
    chosen = {"text": text_files, "all": tracked, "executable": executables}
    files = chosen[kinds]() if kinds in chosen else tracked(kinds)
    assert files, f"no files for {hook}"
    if hook in ("end-of-file-fixer", "trailing-whitespace-fixer"):  # fixers: run on a copy, fail if they would fix
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tmp_path / name)
        result = run(str(BIN / hook), *args, *files, cwd=tmp_path)
    else:
        result = run(str(BIN / hook), *args, *files)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
