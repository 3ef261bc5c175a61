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


def test_every_flag_is_spelt_as_the_setting_it_sets_and_a_hyphenated_spelling_still_parses(python_files):
    """One spelling: the configs' and ``monai.bundle``'s snake case (``--config_file``, ``--image_size``)."""
    import re

    from scripts import cli

    declared = re.compile(r"add_argument\(\s*((?:\"-[^\"]*\",\s*)+)")
    hyphenated = [
        f"{name}: {flag}"
        for name in python_files
        for options in declared.findall((ROOT / name).read_text())
        for flag in re.findall(r"\"(--[^\"]+)\"", options)
        if "-" in flag[2:]
    ]
    assert hyphenated == []
    built = [
        name for name in python_files if re.search(r"add_argument\(\s*f\"--\{[^}]*replace\(", (ROOT / name).read_text())
    ]
    assert built == []  # a flag name built from a setting keeps its spelling
    parser = cli.ArgumentParser(prog="tool")
    parser.add_argument("--n_disease", type=int, default=0)
    parser.add_argument("--image_size", type=int)
    assert vars(parser.parse_args(["--n-disease", "3", "--image-size=64"])) == {"n_disease": 3, "image_size": 64}
    assert vars(parser.parse_args(["--n_disease", "3"])) == {"n_disease": 3, "image_size": None}
    assert cli.snake_case_flag("-n-1") == "-n-1" and cli.snake_case_flag("a-b") == "a-b"
