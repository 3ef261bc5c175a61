#!/usr/bin/env bash
# Create (or update) ./.venv with everything the bundle needs. Idempotent; runs offline from a
# local wheel mirror as well as from PyPI.
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0, the CPU wheel here; elsewhere
#                e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU
#                build, or install the CUDA build of torch into .venv before this script)
#   PYTHON       interpreter used to create .venv (default python3; 3.10, 3.11 and 3.12 resolve)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first: with torch present, later packages that depend on it install nothing more.
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
.venv/bin/python -c "import torch" 2>/dev/null || pip install $TORCH_SPEC
pip install -r requirements.txt
pip install --no-deps -r requirements-hdbet.txt
pip install -r requirements-dev.txt   # the Model Zoo's code-style checks (tests/test_code_style.py)
# The BIDS validator (npm bids-validator 1.15.0) into .venv/node, for tests/test_bids.py's checks of the phantom's
# BIDS output and of the BIDS derivatives; without npm (or the npm registry) those two tests skip.
BIDS_VALIDATOR_SPEC=bids-validator@1.15.0
if ! command -v npm >/dev/null 2>&1; then
    echo "npm not on PATH: the BIDS validator is not installed (its tests in tests/test_bids.py skip)"
elif ! npm ls --prefix .venv/node "$BIDS_VALIDATOR_SPEC" >/dev/null 2>&1; then
    npm install --prefix .venv/node --no-audit --no-fund --loglevel=error "$BIDS_VALIDATOR_SPEC" >/dev/null ||
        echo "npm install $BIDS_VALIDATOR_SPEC failed: the BIDS validator is not installed (its tests skip)"
fi
# Debian's chromium, for tests/test_report.py's headless-browser checks of report.html (driven by playwright from
# requirements-dev.txt, which downloads no browser); without it those tests skip.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
            echo "apt-get install chromium failed: the report's browser tests in tests/test_report.py skip"
    else
        echo "chromium not on PATH (as root, apt-get install chromium): the report's browser tests skip"
    fi
fi
# HD-BET's prediction path: its module, and the nnU-Net trainer module that rebuilds its network.
.venv/bin/python -c "import torch, monai, ants, SimpleITK, HD_BET.hd_bet_prediction, nnunetv2.training.nnUNetTrainer.nnUNetTrainer; print(f'ok: torch {torch.__version__}, monai {monai.__version__}')"
# HD-BET 1.x's shipped weights: all five folds against their pinned SHA-256 (scripts/hdbet.py; never downloads).
.venv/bin/python -m scripts.hdbet --shipped
