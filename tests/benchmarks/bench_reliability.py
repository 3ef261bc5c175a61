"""Prediction intervals and test-retest reliability of a trained model on the phantom.

    python tests/benchmarks/bench_reliability.py [--ckpt models/model.pt] [--coverage 0.9] \
        [--json docs/benchmarks/reliability.json]

The embedded phantom's people (``CohortSpec(n=600, seed=0)``) are rendered four times: research grade, a
research-grade re-scan (``session=1``: fresh noise, pose and bias field), clinical grade and a clinical re-scan.
Then, with ``configs/inference.yaml`` and the checkpoint's own architecture keys (the defaults):

* the split-conformal interval is fitted on the research-grade **validation** predictions
  (``scripts.calibration.fit_from_predictions``, into a temporary folder: the model's own files are not touched);
* on each **test** set: MAE, the interval's empirical coverage and mean width;
* ICC(2,1), ICC(3,1) and Bland-Altman limits of predicted age between research and its re-scan, clinical and
  its re-scan, and research and clinical (``scripts.statistics.icc``, ``bland_altman``).
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


def predict(datalist: Path, splits: list[str], out: Path, ckpt: Path, interval: Path | None) -> list[dict]:
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
        "--input", str(datalist), "--input_splits", json.dumps(splits), "--output_dir", str(out),
        "--ckpt_path", str(ckpt),
    ]  # fmt: skip
    if interval is not None:
        command += ["--interval_path", str(interval)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=str(ROOT / "models" / "model.pt"), help="trained model (default config)")
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    start = time.perf_counter()
    ckpt = Path(args.ckpt).resolve()
    results: dict = {"ckpt": str(ckpt), "coverage_target": args.coverage, "sets": {}, "pairs": {}}
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        tmp = Path(tmp)
        predictions = {}
        for name, settings in SETS.items():
            spec = synthetic.CohortSpec(n=600, seed=0, **settings)
            synthetic.generate(spec, tmp / name, mode="slices", workers=2, progress=False)
        validation = predict(tmp / "research" / "datalist.json", ["validation"], tmp / "val", ckpt, None)
        pred = np.array([float(r["predicted_age"]) for r in validation])
        age = np.array([float(r["age"]) for r in validation])
        interval = PredictionInterval.fit(pred, age, args.coverage)
        interval.save(tmp / "interval.json")
        results["interval"] = {"lower": interval.lower, "upper": interval.upper, "n_validation": interval.n}
        for name in SETS:
            rows = predict(tmp / name / "datalist.json", ["test"], tmp / f"out_{name}", ckpt, tmp / "interval.json")
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
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = "python tests/benchmarks/bench_reliability.py " + " ".join(sys.argv[1:])
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
