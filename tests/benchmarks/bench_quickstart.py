"""The quick start as a new user runs it: a fresh clone of a commit, the README's main command, timed, with the
validation MAE against wall time.

    .venv/bin/python tests/benchmarks/bench_quickstart.py [--commit HEAD] [--json OUT.json] [--figure OUT.png] \
        [--keep runs/quickstart_models]
    .venv/bin/python tests/benchmarks/bench_quickstart.py --commit 37174de --json runs/quickstart_old.json

The commit is cloned into a temporary folder (this checkout's ``.venv`` is linked in: installing is not what is
timed), and ``python -m monai.bundle run training --config_file configs/train.yaml`` runs there under
``/usr/bin/time -v`` (wall time and peak memory), embedded phantom generation included. Every validation line of
its log gives (seconds since the start, validation MAE). With several ``--json`` files from earlier runs
(``--compare``), ``--figure`` draws their curves on one plot. Run it alone on the machine: it is a timing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import cli  # noqa: E402
from scripts.atomic import write_json  # noqa: E402

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Epoch\[(\d+)\] Metrics -- val_mae: ([0-9.]+)")


def run(commit: str, extra: list[str], keep: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        clone = Path(tmp) / "bundle"
        sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
        (clone / ".venv").symlink_to(ROOT / ".venv")
        command = [".venv/bin/python", "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
        start_wall = datetime.now()
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *command, *extra], cwd=clone, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        if proc.returncode:
            raise SystemExit(f"the main job failed at {commit}:\n{log[-3000:]}")
        if keep:  # the trained bundle's models/ (checkpoint and calibration files) for later benchmarks
            shutil.copytree(clone / "models", keep, dirs_exist_ok=True)
    curve = []
    for line in log.splitlines():
        match = STAMP.match(line)
        if match:
            at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            curve.append(
                {
                    "epoch": int(match.group(2)),
                    "seconds": round((at - start_wall).total_seconds(), 1),
                    "val_mae": float(match.group(3)),
                }
            )
    memory = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    phantom = re.findall(r"phantom slices: 100%[^\[]*\[(?:(\d+):)?(\d+):(\d+)<", log)  # tqdm's elapsed time
    return {
        "commit": sha.stdout.strip(),  # resolved when cloned
        "command": " ".join(command + extra),
        "wall_seconds": round(seconds, 1),
        "peak_memory_gb": round(int(memory.group(1)) / 1024**2, 2) if memory else None,
        "phantom_seconds": (
            int(phantom[-1][0] or 0) * 3600 + int(phantom[-1][1]) * 60 + int(phantom[-1][2]) if phantom else None
        ),
        "curve": curve,
        "best_val_mae": min(point["val_mae"] for point in curve) if curve else None,
    }


def figure(runs: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in runs:
        x = [p["seconds"] / 60 for p in result["curve"]]
        ax.plot(x, [p["val_mae"] for p in result["curve"]], "o-", label=f"{result['label']} ({result['commit']})")
        ax.axvline(result["wall_seconds"] / 60, color=ax.lines[-1].get_color(), ls=":", lw=1)
    ax.axhline(5.0, color="grey", ls="--", lw=1)
    ax.axvline(10.0, color="grey", ls="--", lw=1)
    ax.set_xlabel("wall time since the command started (min); dotted: the run ends")
    ax.set_ylabel("validation MAE (years)")
    ax.set_title("Quick start: validation MAE against wall time (fast-path phantom)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="HEAD", help="the commit to clone and run")
    parser.add_argument("--label", default="this commit", help="the curve's name in the figure")
    parser.add_argument("--json", default=None, help="write this run here")
    parser.add_argument("--compare", nargs="*", default=[], help="earlier runs' JSON files to draw with it")
    parser.add_argument("--figure", default=None, help="the MAE-against-wall-time figure (PNG)")
    parser.add_argument("--no_run", action="store_true", help="draw --compare only")
    parser.add_argument("--keep", default=None, help="copy the trained models/ folder here")
    args, extra = parser.parse_known_args(argv)
    runs = [json.loads(Path(path).read_text()) for path in args.compare]
    if not args.no_run:
        result = {"label": args.label, **run(args.commit, extra, args.keep)}
        print(json.dumps(result, indent=1))
        if args.json:
            write_json(args.json, result)
        runs.append(result)
    if args.figure:
        figure(runs, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
