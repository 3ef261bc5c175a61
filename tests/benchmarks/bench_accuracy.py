"""Accuracy benchmark on data with a known answer: the paper's Table 1, ours against the DenseNet121 baseline.

    .venv/bin/python tests/benchmarks/bench_accuracy.py --out docs/benchmarks/accuracy     # ~45 min on 2 CPU cores
    .venv/bin/python tests/benchmarks/bench_accuracy.py --full --out runs/accuracy_full    # paper sizes, for a GPU

One run, every model through the bundle's own commands (``monai.bundle run training`` / ``evaluate``):

1. Generates the synthetic phantom twice from the same seed: research grade (training, validation, test and the
   disease cohort) and clinical grade (thick slices, low SNR, strong bias field, ghosting). Same seed, same
   people: the clinical test set is the research test set re-acquired badly, so the two columns differ only in
   image quality.
2. Trains on the research-grade training set:
   * ours, semi-supervised: 25 % of the training labels + the other 75 % as unlabelled scans;
   * ours, supervised only: the same 25 % labelled scans alone;
   * ours, 100 % labels;
   * DenseNet121 (``configs/baseline_densenet.yaml``), 100 % labels, as the paper's baselines were.
   Every run gets the same number of optimizer steps (``--steps``), so label efficiency is compared at equal
   compute; validation MAE picks the checkpoint as in any training run.
3. Evaluates each model on the research test set, the clinical test set and the disease cohort (brain-PAD
   against survival, which the phantom generated with a known negative association), and writes
   ``OUT/accuracy.md`` (the table, with the phantom's accuracy floor) and ``OUT/accuracy.json``.

The CPU default shrinks the problem to fit ~45 minutes (64x64 slices, a fixed step budget); the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import synthetic  # noqa: E402
from scripts.analysis import pad_outcome_association  # noqa: E402
from scripts.data import is_labelled, load_datalist  # noqa: E402
from scripts.engine import LabelledRatioBatchSampler  # noqa: E402
from scripts.inference import read_predictions  # noqa: E402

MODELS = {  # name: (training datalist, config overlays, batch size)
    "ours, semi-supervised (25% labels + 75% unlabelled)": ("semi25", [], 8),
    "ours, supervised only (the same 25% labels)": ("sup25", [], 8),
    "ours, 100% labels": ("full", [], 8),
    "DenseNet121 baseline, 100% labels": ("full", ["configs/baseline_densenet.yaml"], 8),
    # as many labelled images per step as the supervised-only run, plus as many unlabelled (not in the default run)
    "ours, semi-supervised, batch 16 (8 labelled + 8 unlabelled)": ("semi25", [], 16),
}
EVAL_SETS = {"research": ("full", "test"), "clinical": ("clinical", "test"), "disease": ("full", "disease")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/bench_accuracy", help="output folder (data, runs, table)")
    parser.add_argument("--full", action="store_true", help="the paper's sizes: 128x128, more steps (for a GPU)")
    parser.add_argument("--n", type=int, default=600, help="healthy subjects (+ n/5 disease)")
    parser.add_argument("--image-size", type=int, default=None, help="network input side (default 64; 128 with --full)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per model (default 1200; 6000 with --full)")
    parser.add_argument("--labelled-share", type=float, default=0.25, help="labels kept in the label-efficiency runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=[0, 1, 2, 3], type=int,
                        help="which models to run (indices into the table's rows)")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (128 if args.full else 64)
    args.steps = args.steps or (6000 if args.full else 1200)
    return args


def make_data(args, out: Path) -> dict[str, Path]:
    """Research and clinical phantoms (same people) and the training datalists of the label-efficiency runs."""
    spec = synthetic.CohortSpec(n=args.n, seed=args.seed, unlabelled_fraction=0.0)
    research = Path(synthetic.ensure_dataset(out / "phantom_research", spec)).parent
    clinical = Path(synthetic.ensure_dataset(out / "phantom_clinical", synthetic.CohortSpec(
        n=args.n, seed=args.seed, unlabelled_fraction=0.0, grade="clinical"))).parent
    full = load_datalist(research / "datalist.json")
    rng = np.random.default_rng(args.seed)
    training = full["training"]
    keep = set(rng.choice(len(training), round(args.labelled_share * len(training)), replace=False).tolist())
    semi = [item if i in keep else {k: v for k, v in item.items() if k not in ("age", "brain_age")}
            for i, item in enumerate(training)]
    lists = {"full": {**full}, "semi25": {**full, "training": semi},
             "sup25": {**full, "training": [item for i, item in enumerate(training) if i in keep]},
             "clinical": load_datalist(clinical / "datalist.json")}
    paths = {}
    for name, datalist in lists.items():
        clean = {split: [{k: v for k, v in item.items() if not (k == "age" and isinstance(v, float) and math.isnan(v))}
                         for item in items] for split, items in datalist.items()}
        paths[name] = out / f"datalist_{name}.json"
        paths[name].write_text(json.dumps(clean, indent=1))
    return paths


def steps_per_epoch(datalist: Path, batch_size: int, labelled_ratio: float) -> int:
    training = load_datalist(datalist, splits=["training"], check_files=False)["training"]
    return len(LabelledRatioBatchSampler([is_labelled(item) for item in training], batch_size, labelled_ratio))


def bundle(run_id: str, configs: list[str], log: Path, **overrides) -> float:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    with open(log, "w") as fh:
        result = subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - start


def train_and_evaluate(args, name: str, index: int, data: dict[str, Path], out: Path) -> dict:
    training_list, overlays, batch_size = MODELS[name]
    folder = out / f"model{index}"
    folder.mkdir(parents=True, exist_ok=True)
    labelled_ratio = 1.0 if overlays else 0.5
    per_epoch = steps_per_epoch(data[training_list], batch_size, labelled_ratio)
    epochs = max(1, math.ceil(args.steps / per_epoch))
    common = {"ckpt_path": folder / "model.pt", "image_size": args.image_size, "batch_size": batch_size}
    print(f"[{name}] {epochs} epochs x {per_epoch} steps", flush=True)
    seconds = bundle("training", ["configs/train.yaml", *overlays], folder / "train.log",
                     datalist=data[training_list], output_dir=folder / "run", max_epochs=epochs,
                     val_interval=max(1, epochs // 15), **common)
    result = {"model": name, "epochs": epochs, "steps": epochs * per_epoch, "train_seconds": round(seconds, 1)}
    for label, (datalist, split) in EVAL_SETS.items():
        target = folder / f"eval_{label}"
        bundle("evaluate", ["configs/train.yaml", *overlays, "configs/evaluate.yaml"], folder / f"eval_{label}.log",
               datalist=data[datalist], eval_split=split, output_dir=target, **common)
        metrics = json.loads((target / "metrics.json").read_text())
        result[label] = {key: metrics[key] for key in ("n", "r", "mae", "r2", "rmse", "pad_mean", "pad_std")}
        if label == "disease":
            result[label]["survival"] = pad_outcome_association(read_predictions(target / "predictions.csv"),
                                                                "survival_months", "brain_pad_corrected")
    print(json.dumps(result), flush=True)
    return result


def table(args, results: list[dict], floor: dict, truth: dict, minutes: float) -> str:
    def cell(value, spec=".2f"):
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [
        "| model | research r | research MAE | research R² | clinical r | clinical MAE | clinical R² "
        "| PAD–survival r (p), disease cohort |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["disease"]["survival"]
        lines.append(f"| {r['model']} | {cell(r['research']['r'])} | {cell(r['research']['mae'])} | "
                     f"{cell(r['research']['r2'])} | {cell(r['clinical']['r'])} | {cell(r['clinical']['mae'])} | "
                     f"{cell(r['clinical']['r2'])} | {cell(s['r'])} ({cell(s['p'], '.1e')}) |")
    lines.append(f"| *accuracy floor (knows brain age exactly)* | {floor['r']:.2f} | {floor['mae']:.2f} | "
                 f"{floor['r2']:.2f} | {floor['r']:.2f} | {floor['mae']:.2f} | {floor['r2']:.2f} | "
                 f"{truth['sample_r']:.2f} (true δ of these subjects) |")
    settings = (f"{args.image_size}×{args.image_size} slices, {args.steps} optimizer steps per model (batch 8 unless "
                f"named), "
                f"{args.n} healthy + {args.n // 5} disease phantom subjects (seed {args.seed}), "
                f"labels kept in the 25 % runs: {args.labelled_share:.0%}")
    return "\n".join(lines) + f"\n\nSettings: {settings}. Wall time {minutes:.0f} min.\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_data(args, out)
    phantom = json.loads((Path(data["full"]).parent / "phantom_research" / "phantom.json").read_text())
    floor = phantom["accuracy_floor"]
    truth = {"r": phantom["disease_true_pad_survival_r"], "sample_r": phantom["disease_sample_pad_survival_r"]}
    names = list(MODELS)
    results = [train_and_evaluate(args, names[i], i, data, out) for i in args.models]
    minutes = (time.perf_counter() - start) / 60
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
              "settings": vars(args), "accuracy_floor": floor, "true_survival_association": truth,
              "results": results, "minutes": round(minutes, 1)}
    (out / "accuracy.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(args, results, floor, truth, minutes)
    (out / "accuracy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
