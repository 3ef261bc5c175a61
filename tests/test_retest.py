"""Test-retest reliability: ICC against Shrout & Fleiss's worked example, Bland-Altman, the analysis command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.statistics import bland_altman, icc

ROOT = Path(__file__).resolve().parents[1]


def test_icc_matches_shrout_and_fleiss_table_4():
    # Shrout & Fleiss (1979), Psychol Bull 86:420, Table 2 data (6 targets, 4 judges); their Table 4 gives
    # ICC(2,1) = .29 and ICC(3,1) = .71
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    result = icc(ratings)
    assert result["icc_2_1"] == pytest.approx(0.290, abs=5e-3)
    assert result["icc_3_1"] == pytest.approx(0.715, abs=5e-3)
    # an offset between sessions lowers absolute agreement, not consistency
    people = np.linspace(20, 80, 10)
    shifted = icc(np.stack([people, people + 5], axis=1))
    assert shifted["icc_3_1"] == pytest.approx(1.0) and shifted["icc_2_1"] < 0.99
    with pytest.raises(ValueError, match="subjects >= 2, sessions >= 2"):
        icc([[1, 2]])


def test_bland_altman_values():
    result = bland_altman([10, 20, 30, 40], [11, 23, 30, 42])
    differences = np.array([1, 3, 0, 2])
    assert result["bias"] == pytest.approx(1.5)
    assert result["sd"] == pytest.approx(differences.std(ddof=1))
    assert result["loa_upper"] - result["loa_lower"] == pytest.approx(2 * 1.96 * differences.std(ddof=1))


def test_reliability_command_joins_two_runs_and_draws_the_plot(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.uniform(30, 80, 30)
    for name, noise in (("first", 0.0), ("second", 1.0)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["subject", "image", "predicted_age", "age"])
            writer.writeheader()
            for i, age in enumerate(truth):
                value = age + noise * rng.normal()
                writer.writerow({"subject": f"s{i:02d}", "image": "x", "predicted_age": f"{value:.3f}", "age": ""})
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.analysis",
            "reliability",
            str(tmp_path / "first.csv"),
            str(tmp_path / "second.csv"),
            "--names",
            "research",
            "clinical",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "reliability.json").read_text())
    assert saved["n"] == 30 and 0.99 < saved["icc_2_1"] <= 1.0
    assert "ICC(2,1) absolute agreement" in result.stdout
    assert (out / "bland_altman.png").read_bytes()[:4] == b"\x89PNG"
