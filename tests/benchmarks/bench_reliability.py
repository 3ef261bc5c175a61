"""Prediction intervals and test-retest reliability of a trained model on the phantom.

    python tests/benchmarks/bench_reliability.py [--ckpt models/model.pt ...] [--image-size 128] [--coverage 0.9] \
        [--json docs/benchmarks/reliability.json]

The embedded phantom's people (``CohortSpec(n=600, seed=0)``) are rendered four times: research grade, a
research-grade re-scan (``session=1``: fresh noise, pose and bias field), clinical grade and a clinical re-scan.
Then, with ``configs/inference.yaml`` and the checkpoint's own architecture keys (the defaults):

* the split-conformal interval is fitted on the research-grade **validation** predictions
  (``scripts.calibration.fit_from_predictions``, into a temporary folder: the model's own files are not touched);
* on each **test** set: MAE, the interval's empirical coverage and mean width;
* ICC(2,1), ICC(3,1) and Bland-Altman limits of predicted age between research and its re-scan, clinical and
  its re-scan, and research and clinical (``scripts.statistics.icc``, ``bland_altman``).

With several checkpoints (e.g. one per seed, ``--image-size`` their network input), each is measured on the same
renders and ``summary`` gives the mean and sd over them.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import synthetic  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.calibration import PredictionInterval  # noqa: E402
from scripts.statistics import bland_altman, icc, interval_metrics  # noqa: E402

SETS = {
    "research": {"grade": "research", "session": 0},
    "research_rescan": {"grade": "research", "session": 1},
    "clinical": {"grade": "clinical", "session": 0},
    "clinical_rescan": {"grade": "clinical", "session": 1},
}
PAIRS = (("research", "research_rescan"), ("clinical", "clinical_rescan"), ("research", "clinical"))


def predict(
    datalist: Path, splits: list[str], out: Path, ckpt: Path, interval: Path | None, image_size: int = 128
) -> list[dict]:
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
        "--input", str(datalist), "--input_splits", json.dumps(splits), "--output_dir", str(out),
        "--ckpt_path", str(ckpt), "--image_size", str(image_size),
    ]  # fmt: skip
    if interval is not None:
        command += ["--interval_path", str(interval)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def measure(tmp: Path, ckpt: Path, coverage: float, image_size: int) -> dict:
    """One model on the four renders: interval fitted on research validation, MAE/coverage/width, ICC, Bland-Altman."""
    results: dict = {"ckpt": str(ckpt), "sets": {}, "pairs": {}}
    work = tmp / ckpt.parent.name
    work.mkdir(parents=True, exist_ok=True)
    validation = predict(tmp / "research" / "datalist.json", ["validation"], work / "val", ckpt, None, image_size)
    pred = np.array([float(r["predicted_age"]) for r in validation])
    age = np.array([float(r["age"]) for r in validation])
    interval = PredictionInterval.fit(pred, age, coverage)
    interval.save(work / "interval.json")
    results["interval"] = {"lower": interval.lower, "upper": interval.upper, "n_validation": interval.n}
    predictions = {}
    for name in SETS:
        rows = predict(
            tmp / name / "datalist.json", ["test"], work / f"out_{name}", ckpt, work / "interval.json", image_size
        )
        predictions[name] = {r["subject"]: r for r in rows}
        p = np.array([float(r["predicted_age"]) for r in rows])
        a = np.array([float(r["age"]) for r in rows])
        lower = np.array([float(r["predicted_age_lower"]) for r in rows])
        upper = np.array([float(r["predicted_age_upper"]) for r in rows])
        results["sets"][name] = {
            "n": len(rows),
            "mae": float(np.abs(p - a).mean()),
            **interval_metrics(lower, upper, a),
        }
    for first, second in PAIRS:
        subjects = sorted(predictions[first])
        pairs = np.array([[float(predictions[k][s]["predicted_age"]) for k in (first, second)] for s in subjects])
        results["pairs"][f"{first} vs {second}"] = {**icc(pairs), **bland_altman(pairs[:, 0], pairs[:, 1])}
    return results


def summarise(models: list[dict]) -> dict:
    """Mean and sd over models of every number in ``sets`` and ``pairs``."""
    summary: dict = {}
    for group in ("sets", "pairs"):
        summary[group] = {}
        for name, values in models[0][group].items():
            summary[group][name] = {}
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    column = np.array([m[group][name][key] for m in models], dtype=float)
                    sd = float(column.std(ddof=1)) if len(column) > 1 else 0.0
                    summary[group][name][key] = {"mean": float(column.mean()), "sd": sd}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ckpt", nargs="+", default=[str(ROOT / "models" / "model.pt")], help="trained model(s), e.g. one per seed"
    )
    parser.add_argument("--image-size", type=int, default=128, help="the models' image_size")
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    start = time.perf_counter()
    ckpts = [Path(c).resolve() for c in args.ckpt]
    if len({c.parent.name for c in ckpts}) != len(ckpts):
        parser.error("give checkpoints in differently named folders (e.g. seed0/, seed1/)")
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        tmp = Path(tmp)
        for name, settings in SETS.items():
            spec = synthetic.CohortSpec(n=600, seed=0, **settings)
            synthetic.generate(spec, tmp / name, mode="slices", workers=2, progress=False)
        models = [measure(tmp, ckpt, args.coverage, args.image_size) for ckpt in ckpts]
    # one model: its results at the top level, as before; several: each model's and their summary
    results = dict(models[0]) if len(models) == 1 else {"models": models, "summary": summarise(models)}
    results["coverage_target"] = args.coverage
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = "python tests/benchmarks/bench_reliability.py " + " ".join(sys.argv[1:])
    print(json.dumps(results.get("summary", results), indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
