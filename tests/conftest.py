"""Shared fixtures: small phantom datasets generated once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bundle root holds the `scripts` package, as for monai.bundle
torch.set_num_threads(min(2, os.cpu_count() or 1))

from scripts import synthetic  # noqa: E402


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def slice_dataset(tmp_path_factory) -> Path:
    """40 healthy + 8 disease research-grade subjects as preprocessed slices (fast path)."""
    out = tmp_path_factory.mktemp("phantom_slices")
    synthetic.generate(synthetic.CohortSpec(n=40, seed=7, n_disease=8), out, mode="slices", progress=False)
    return out


@pytest.fixture(scope="session")
def volume_dataset(tmp_path_factory) -> Path:
    """Raw scanner-space volumes of 5 subjects (mixed grades) with their MNI ground-truth slices."""
    out = tmp_path_factory.mktemp("phantom_volumes")
    synthetic.generate(synthetic.CohortSpec(n=4, seed=3, n_disease=1, grade="mixed"), out, mode="volumes", progress=False)
    return out
