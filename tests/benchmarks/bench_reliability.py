"""Prediction intervals and test-retest reliability of trained models: coverage by grade and by age third, ICC.

    python tests/benchmarks/bench_reliability.py --ckpt models/model.pt [--image_size 128] \
        [--fresh 300] [--cohort runs/chain_cohort/datalist.json] [--json docs/benchmarks/reliability.json]

Test people, never used in training or calibration, in up to two forms:

* **fast path** (always): the embedded phantom's test split (``CohortSpec(n=600, seed=0)``, 90 people) rendered
  four times, research grade, a research re-scan (``session=1``), clinical grade and a clinical re-scan; and with
  ``--fresh N`` a fresh cohort of N new people (``--fresh_seed``, 101) at both grades, for coverage by age third;
* **chain** (``--cohort``, ``tests/benchmarks/chain_cohort.py``): the same test people's raw volumes through the
  real chain, research and clinical grade and their re-scans.

Each model (``--ckpt``, several: e.g. one per seed) predicts every set with ``configs/inference.yaml``, and each set
is scored with up to three intervals:

* ``model``: the calibration files beside the checkpoint (what a user gets: Mondrian split-conformal for typical and
  atypical acquisitions, fitted on the training datalist's calibration split);
* ``validation``: the interval of earlier versions, one band fitted on the research validation split that also chose
  the checkpoint (``scripts.calibration.PredictionInterval.fit`` without quality), for comparison;
* ``chain`` (with ``--cohort``): refitted on the cohort's chain-preprocessed ``calibration`` list, as a user
  calibrates on scans of their own chain and scanner.

Per set: MAE, bias, each interval's coverage and mean width, overall and in each third of the age range
(18-42, 42-66, 66-90 years), and the same for the age-conditional interval of the corrected brain-PAD where the
interval has one (``model_age_conditional``, ``chain_age_conditional``: how often it holds 0). ICC(2,1), ICC(3,1)
and Bland-Altman between research and its re-scan, clinical and its re-scan, and research and clinical. With
several models the summary gives mean and sd over them.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import cli  # noqa: E402
from scripts import phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.calibration import (  # noqa: E402
    BiasCorrection,
    PredictionInterval,
    bias_correction_path,
    fit_from_predictions,
    interval_path,
)
from scripts.quality import QUALITY_METRICS  # noqa: E402
from scripts.statistics import bland_altman, icc, interval_metrics  # noqa: E402

FAST_SETS = {  # name: (grade, session)
    "research": ("research", 0),
    "research_rescan": ("research", 1),
    "clinical": ("clinical", 0),
    "clinical_rescan": ("clinical", 1),
}
CHAIN_SETS = {  # name: the cohort's list
    "chain_research": "research_test",
    "chain_research_rescan": "research_rescan",
    "chain_clinical": "clinical_test",
    "chain_clinical_rescan": "clinical_rescan",
}
PAIRS = (("research", "research_rescan"), ("clinical", "clinical_rescan"), ("research", "clinical"))
AGE_THIRDS = ((18.0, 42.0), (42.0, 66.0), (66.0, 90.01))


def predict(datalist: Path, splits: list[str], out: Path, ckpt: Path, image_size: int) -> list[dict]:
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
        "--input", str(datalist), "--input_splits", json.dumps(splits), "--output_dir", str(out),
        "--ckpt_path", str(ckpt), "--image_size", str(image_size),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def render_fast(tmp: Path, fresh: int, fresh_seed: int = 101) -> dict[str, tuple[Path, str]]:
    """{set: (datalist, list)} of the fast-path test sets (and the fresh cohort at both grades)."""
    sets = {}
    jobs = []
    for name, (grade, session) in FAST_SETS.items():  # the test split only (and the validation people, once)
        spec = phantom.CohortSpec(n=600, seed=0, n_calibration=120, grade=grade, session=session)
        wanted = ("test", "validation") if name == "research" else ("test",)
        lists: dict[str, list] = {split: [] for split in wanted}
        for subject in phantom.sample_cohort(spec):
            if subject.split in wanted:
                image = tmp / name / f"{subject.subject}.nii.gz"
                lists[subject.split].append({"image": str(image), "subject": subject.subject, "age": subject.age})
                jobs.append((subject, image))
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "datalist.json").write_text(json.dumps(lists))
        sets[name] = (tmp / name / "datalist.json", "test")
    phantom.build_atlas()  # once, before the workers fork
    with multiprocessing.get_context("fork").Pool(2, initializer=phantom._one_thread) as pool:
        pool.starmap(phantom.write_slice, jobs)
    if fresh:
        for grade in ("research", "clinical"):
            spec = phantom.CohortSpec(
                n=fresh,
                seed=fresh_seed,
                grade=grade,
                n_disease=0,
                unlabelled_fraction=0.0,
                val_fraction=0.0,
                test_fraction=0.0,
            )
            sets[f"fresh_{grade}"] = (Path(phantom.ensure_dataset(tmp / f"fresh_{grade}", spec, workers=2)), "training")
    return sets


def score(rows: list[dict], intervals: dict[str, PredictionInterval], correction: BiasCorrection | None) -> dict:
    """MAE, bias, and each interval's coverage and width, overall and by age third; for an interval with
    age-conditional bands, also theirs (``<name>_age_conditional``: how often the corrected PAD's interval holds 0)."""
    p = np.array([float(r["predicted_age"]) for r in rows])
    a = np.array([float(r["age"]) for r in rows])
    q = np.array([[float(r[m]) if r.get(m) else np.nan for m in QUALITY_METRICS] for r in rows]).reshape(-1, 3)
    result = {"n": len(rows), "mae": float(np.abs(p - a).mean()), "bias": float((p - a).mean()), "intervals": {}}
    for name, interval in intervals.items():
        lower, upper = interval.bounds(p, q)
        result["intervals"][name] = {**interval_metrics(lower, upper, a), **by_third((lower <= a) & (a <= upper), a)}
        bounds = interval.corrected_pad_bounds(p, a, correction, q) if correction is not None else None
        if bounds is not None:
            held = (bounds[0] <= 0) & (0 <= bounds[1])
            result["intervals"][f"{name}_age_conditional"] = {
                "interval_coverage": float(held.mean()),
                "interval_width": float(np.mean(bounds[1] - bounds[0])),
                **by_third(held, a),
            }
    return result


def by_third(covered: np.ndarray, age: np.ndarray) -> dict:
    """Coverage in each third of the age range (None for a third without scans)."""
    thirds = ((low, high, (age >= low) & (age < high)) for low, high in AGE_THIRDS)
    return {f"coverage_{low:.0f}_{high:.0f}": float(covered[t].mean()) if t.any() else None for low, high, t in thirds}


def measure(tmp: Path, ckpt: Path, sets: dict, cohort: Path | None, image_size: int, coverage: float) -> dict:
    work = tmp / ckpt.parent.name
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model" / "model.pt"  # a copy, so refitting never touches the model's own files
    model.parent.mkdir(parents=True)
    for file in ckpt.parent.glob(f"{ckpt.stem}*"):
        shutil.copy(file, model.parent / file.name.replace(ckpt.stem, "model", 1))
    intervals = {"model": PredictionInterval.load(interval_path(model))}
    correction = BiasCorrection.load(bias_correction_path(model)) if bias_correction_path(model).exists() else None
    validation = predict(sets["research"][0], ["validation"], work / "val", model, image_size)
    pred = [float(r["predicted_age"]) for r in validation]
    intervals["validation"] = PredictionInterval.fit(pred, [float(r["age"]) for r in validation], coverage=coverage)
    results: dict = {"ckpt": str(ckpt), "sets": {}, "pairs": {}}
    predictions = {}
    for name, (datalist, split) in sets.items():
        rows = predict(datalist, [split], work / f"out_{name}", model, image_size)
        predictions[name] = {r["subject"]: r for r in rows}
        results["sets"][name] = score(rows, intervals, correction)
    if cohort is not None:
        calibration = work / "chain_model" / "model.pt"
        shutil.copytree(model.parent, calibration.parent)
        predict(cohort, ["calibration"], work / "chain_calibration", calibration, image_size)
        fit_from_predictions(
            work / "chain_calibration" / "predictions.csv", calibration, coverage=coverage, correction_split=None,
            image_size=image_size,
        )  # fmt: skip
        chain_intervals = {**intervals, "chain": PredictionInterval.load(interval_path(calibration))}
        for name, split in CHAIN_SETS.items():
            rows = predict(cohort, [split], work / f"out_{name}", calibration, image_size)
            predictions[name] = {r["subject"]: r for r in rows}
            results["sets"][name] = score(rows, chain_intervals, correction)
    for prefix in ("", "chain_") if cohort is not None else ("",):
        for first, second in PAIRS:
            a, b = predictions[prefix + first], predictions[prefix + second]
            subjects = sorted(set(a) & set(b))
            pairs = np.array([[float(a[s]["predicted_age"]), float(b[s]["predicted_age"])] for s in subjects])
            results["pairs"][f"{prefix}{first} vs {prefix}{second}"] = {
                **icc(pairs),
                **bland_altman(pairs[:, 0], pairs[:, 1]),
            }
    return results


def summarise(models: list[dict]) -> dict:
    """Mean and sd over models of every number (nested dicts flattened into keys joined by '/')."""

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}/")
            elif isinstance(value, (int, float)) and value is not None:
                yield f"{prefix}{key}", float(value)

    keys = [dict(flat({"sets": m["sets"], "pairs": m["pairs"]})) for m in models]
    summary = {}
    for key in keys[0]:
        values = np.array([k[key] for k in keys if key in k])
        summary[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return summary


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", default=[str(ROOT / "models" / "model.pt")], help="trained model(s)")
    parser.add_argument("--image_size", type=int, default=128, help="the models' image_size")
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--fresh", type=int, default=0, help="also a fresh fast-path cohort of this many people")
    parser.add_argument("--fresh_seed", type=int, default=101, help="the fresh cohort's seed")
    parser.add_argument("--cohort", default=None, help="the chain-preprocessed cohort's datalist (chain_cohort.py)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    start = time.perf_counter()
    ckpts = [Path(c).resolve() for c in args.ckpt]
    if len({c.parent.name for c in ckpts}) != len(ckpts):
        parser.error("give checkpoints in differently named folders (e.g. seed0/, seed1/)")
    cohort = Path(args.cohort).resolve() if args.cohort else None
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        sets = render_fast(Path(tmp), args.fresh, args.fresh_seed)
        models = [measure(Path(tmp), c, sets, cohort, args.image_size, args.coverage) for c in ckpts]
    results = {"models": models, "summary": summarise(models), "coverage_target": args.coverage}
    results["phantom_version"] = phantom.PHANTOM_VERSION
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = "python tests/benchmarks/bench_reliability.py " + " ".join(sys.argv[1:])
    print(json.dumps(results["summary"], indent=1))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
