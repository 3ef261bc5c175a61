"""Accuracy benchmark on data with a known answer: several seeds per model, paired tests between models.

    .venv/bin/python tests/benchmarks/bench_accuracy.py --models semi-mixed sup25 --seeds 0 1 2 --out runs/bench_semi
    .venv/bin/python tests/benchmarks/bench_accuracy.py --models full densenet --seeds 0 1 2 --out runs/bench_base
    .venv/bin/python tests/benchmarks/bench_accuracy.py --models full-aug full --seeds 0 1 2 --steps 200 --out runs/bench_aug
    .venv/bin/python tests/benchmarks/bench_accuracy.py --models full-levels full full-median full-levels-medial \
        --seeds 0 1 2 --steps 200 --out runs/bench_levels
    .venv/bin/python tests/benchmarks/bench_accuracy.py --models full-levels full --seeds 0 1 2 --steps 200 \
        --slice_levels 3 --slice_level_spacing 2 --out runs/bench_levels3
    .venv/bin/python tests/benchmarks/bench_accuracy.py --full ...     # paper sizes (128x128, 6000 steps), for a GPU

Every model is trained and evaluated through the bundle's own commands (``monai.bundle run training`` /
``evaluate``):

1. The synthetic phantom is generated twice from one seed: research grade (training, validation, test and the
   disease cohort) and clinical grade (thick slices, low SNR, strong bias field, ghosting). Same seed, same
   people: the clinical test set is the research test set re-acquired badly.
2. Models (``--models``; each trained once per ``--seeds`` value, which also draws its labelled subset):
   * ``semi-mixed``: 25 % of the training subjects labelled (research grade) + the other 75 % unlabelled, half of
     them clinical grade: the paper's situation of plenty of unlabelled low-quality scans. Batch 16 with 8
     labelled, so every step sees as many labelled images as ``sup25``;
   * ``sup25``: the same 25 % labelled scans alone, batch 8;
   * ``semi10-clinical``: 10 % of the training subjects labelled (research grade) + every other one's clinical-grade
     scan unlabelled (9x the labelled set, the target domain), batch 16 with 8 labelled; ``sup10``: those labels alone;
   * ``full``: ours with every training label (research grade), batch 8;
   * ``densenet``: the DenseNet121 baseline (``configs/baseline_densenet.yaml``) with every label;
   * ``full-aug``: ``full`` with acquisition augmentation (``configs/augment_clinical.yaml``);
   * ``full-levels``: ``full`` trained on ``--slice_levels`` axial levels (one drawn per image per step) and
     evaluated on the median of their predictions (``slice_levels``);
   * ``full-median``: the ``full`` checkpoint evaluated on the median of the levels (inference-only combination);
   * ``full-levels-medial``: the ``full-levels`` checkpoint evaluated on the medial slice alone;
   * ``full-aug-contrast``: ``full`` with gamma and histogram-shift augmentation at 0.5 each (contrast is the
     clinical-grade factor that costs most, ``bench_clinical_factors.py``).
   Every run gets the same number of optimizer steps (``--steps``); validation MAE picks the checkpoint. With a
   multi-level model the phantom is written with ``--slice_levels`` levels; the single-level models read its
   centre level, which is the single-level phantom's slice. A run whose ``result.json`` exists in ``OUT`` is
   reused, not redone (delete its folder to redo it), so new models can be paired with earlier runs; with
   ``--cohort``, a reused run is evaluated on the chain sets it lacks.
3. Each model is evaluated on the research test set, the clinical test set and the disease cohort (brain-PAD
   against survival, which the phantom generated with a known negative association): the phantom's fast-path
   slices of them and, with ``--cohort`` (``tests/benchmarks/chain_cohort.py``'s datalist), the same people's raw
   volumes through the real chain (``chain_research``, ``chain_clinical``, ``chain_disease``). On the chain sets
   the interval is the one calibrated on the cohort's chain-preprocessed ``calibration`` list (as a user calibrates
   on scans of their own), written beside a copy of the checkpoint.
4. For each pair in ``PAIRS`` present, per evaluation set: mean +/- sd of MAE over seeds, a paired t-test over
   seeds (same seed = same labelled subset and initialisation) and a Wilcoxon signed-rank test over test subjects
   of their absolute error averaged over seeds. A difference is called one only when p < 0.05.

Writes ``OUT/accuracy.json`` and ``OUT/accuracy.md``. The CPU default (64x64, 800 steps) is sized for this machine.
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
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import cli  # noqa: E402
from scripts import phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.data import is_labelled, load_datalist  # noqa: E402
from scripts.inference import read_predictions  # noqa: E402
from scripts.samplers import LabelledRatioBatchSampler  # noqa: E402
from scripts.statistics import pad_outcome_association  # noqa: E402

MODELS = {  # name: (description, training datalist, config overlays, batch size, labelled ratio)
    "semi-mixed": ("ours, 25 % labels + 75 % unlabelled (half clinical grade)", "semi_mixed", [], 16, 0.5),
    "sup25": ("ours, the same 25 % labels alone", "sup25", [], 8, 1.0),
    "semi10-clinical": (
        "ours, 10 % labels + the other 90 % unlabelled, all clinical grade (9x the labels)",
        "semi_clinical10",
        [],
        16,
        0.5,
    ),
    "sup10": ("ours, the same 10 % labels alone", "sup10", [], 8, 1.0),
    "full": ("ours, 100 % labels", "full", [], 8, 1.0),
    "densenet": ("DenseNet121 baseline, 100 % labels", "full", ["configs/baseline_densenet.yaml"], 8, 1.0),
    "full-aug": ("ours, 100 % labels, acquisition augmentation", "full", ["configs/augment_clinical.yaml"], 8, 1.0),
    "full-levels": ("ours, 100 % labels, several axial levels (median)", "full", [], 8, 1.0),
    "full-median": ("ours, 100 % labels, medial training, median of levels at inference", "full", [], 8, 1.0),
    "full-levels-medial": (
        "ours, 100 % labels, trained on several levels, medial slice at inference",
        "full",
        [],
        8,
        1.0,
    ),
    "full-aug-contrast": (
        "ours, 100 % labels, contrast augmentation (gamma + histogram shift, 0.5 each)",
        "full",
        [],
        8,
        1.0,
    ),
}
# Config overrides of a model's training run (contrast: the acquisition factor that costs most, docs/accuracy.md).
TRAINING_OVERRIDES = {"full-aug-contrast": {"aug_contrast_prob": 0.5, "aug_histogram_shift_prob": 0.5}}
# Multi-level models: (slice_levels in training, slice_levels in evaluation, model whose checkpoint is reused)
# with L = --slice_levels; the others train and evaluate on the medial slice.
LEVELS = {
    "full-levels": ("L", "L", None),
    "full-median": (1, "L", "full"),
    "full-levels-medial": ("L", 1, "full-levels"),
}
PAIRS = [
    ("semi-mixed", "sup25"),
    ("semi10-clinical", "sup10"),
    ("full", "densenet"),
    ("full-aug", "full"),
    ("full-levels", "full"),
    ("full-median", "full"),
    ("full-levels", "full-levels-medial"),
    ("full-aug-contrast", "full"),
]
EVAL_SETS = {"research": ("full", "test"), "clinical": ("clinical", "test"), "disease": ("full", "disease")}
# with --cohort: the same people through the real chain
CHAIN_SETS = {"chain_research": "research_test", "chain_clinical": "clinical_test", "chain_disease": "disease"}


def chain_sets(cohort: str | None) -> dict[str, str]:
    """The chain sets the cohort has people for (a cohort built with ``--n_disease 0`` has no disease list)."""
    if not cohort:
        return {}
    lists = json.loads(Path(cohort).read_text())
    return {label: split for label, split in CHAIN_SETS.items() if lists.get(split)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default="runs/bench_accuracy", help="output folder (data, runs, table)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["semi-mixed", "sup25"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one training run per seed and model")
    parser.add_argument("--full", action="store_true", help="the paper's sizes: 128x128, more steps (for a GPU)")
    parser.add_argument("--n", type=int, default=600, help="healthy subjects (+ n/5 disease)")
    parser.add_argument("--image_size", type=int, default=None, help="network input side (default 64; 128 with --full)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 800; 6000 with --full)"
    )
    parser.add_argument("--labelled_share", type=float, default=0.25, help="labels kept in the 25 % runs")
    parser.add_argument("--phantom_seed", type=int, default=0, help="seed of the phantom (the people)")
    parser.add_argument("--slice_levels", type=int, default=5, help="axial levels of the multi-level models (odd)")
    parser.add_argument("--slice_level_spacing", type=int, default=4, help="130-grid slices between the levels")
    parser.add_argument(
        "--cohort", default=None, help="also evaluate on this chain-preprocessed cohort (chain_cohort.py's datalist)"
    )
    args = parser.parse_args(argv)
    for name, (_, _, reused) in LEVELS.items():
        if name in args.models and reused and reused not in args.models:
            parser.error(f"{name} evaluates the checkpoint of {reused}: add {reused} to --models")
    args.image_size = args.image_size or (128 if args.full else 64)
    args.steps = args.steps or (6000 if args.full else 800)
    return args


def _clean(datalist: dict) -> dict:
    """A datalist as JSON: NaN ages (unlabelled) left out, as a user would write it."""
    return {
        split: [
            {k: v for k, v in item.items() if not (k == "age" and isinstance(v, float) and math.isnan(v))}
            for item in items
        ]
        for split, items in datalist.items()
    }


def make_data(args, out: Path) -> dict:
    """Research and clinical phantoms (same people) and, per seed, the training datalists of the 25 % runs."""
    spec = dict(n=args.n, seed=args.phantom_seed, unlabelled_fraction=0.0)
    levels = args.slice_levels if any(name in LEVELS for name in args.models) else 1
    research = Path(
        phantom.ensure_dataset(
            out / "phantom_research", phantom.CohortSpec(**spec), levels=levels, level_spacing=args.slice_level_spacing
        )
    ).parent
    clinical = Path(
        phantom.ensure_dataset(
            out / "phantom_clinical",
            phantom.CohortSpec(**spec, grade="clinical"),
            levels=levels,
            level_spacing=args.slice_level_spacing,
        )
    ).parent
    full, clinical_lists = load_datalist(research / "datalist.json"), load_datalist(clinical / "datalist.json")
    clinical_by_subject = {item["subject"]: item for item in clinical_lists["training"]}
    paths = {"full": out / "datalist_full.json", "clinical": out / "datalist_clinical.json"}
    paths["full"].write_text(json.dumps(_clean(full), indent=1))
    paths["clinical"].write_text(json.dumps(_clean(clinical_lists), indent=1))
    for seed in args.seeds:
        rng = np.random.default_rng([seed, 1])
        training = full["training"]
        keep = set(rng.choice(len(training), round(args.labelled_share * len(training)), replace=False).tolist())
        unlabelled = [i for i in range(len(training)) if i not in keep]
        as_clinical = set(rng.choice(unlabelled, len(unlabelled) // 2, replace=False).tolist())
        semi = []
        for i, item in enumerate(training):
            if i in keep:
                semi.append(item)
            else:
                source = clinical_by_subject[item["subject"]] if i in as_clinical else item
                semi.append({k: v for k, v in source.items() if k not in ("age", "brain_age")})
        lists = {
            "semi_mixed": {**full, "training": semi},
            "sup25": {**full, "training": [item for i, item in enumerate(training) if i in keep]},
        }
        # 10 % of the labels; every other training person's scan unlabelled and clinical grade (issue 25's regime)
        keep10 = set(
            np.random.default_rng([seed, 10]).choice(len(training), round(0.1 * len(training)), False).tolist()
        )
        lists["sup10"] = {**full, "training": [item for i, item in enumerate(training) if i in keep10]}
        lists["semi_clinical10"] = {
            **full,
            "training": [
                (
                    item
                    if i in keep10
                    else {
                        k: v for k, v in clinical_by_subject[item["subject"]].items() if k not in ("age", "brain_age")
                    }
                )
                for i, item in enumerate(training)
            ],
        }
        for name, datalist in lists.items():
            paths[f"{name}_{seed}"] = out / f"datalist_{name}_seed{seed}.json"
            paths[f"{name}_{seed}"].write_text(json.dumps(_clean(datalist), indent=1))
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


def train_and_evaluate(args, name: str, seed: int, data: dict, out: Path) -> dict:
    description, training_list, overlays, batch_size, labelled_ratio = MODELS[name]
    datalist = data[training_list] if training_list in data else data[f"{training_list}_{seed}"]
    folder = out / name / f"seed{seed}"
    previous = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else None
    if previous and not any(label not in previous for label in chain_sets(args.cohort)):
        print(f"[{name}, seed {seed}] reused: {folder / 'result.json'}", flush=True)
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    per_epoch = steps_per_epoch(datalist, batch_size, labelled_ratio)
    epochs = max(1, math.ceil(args.steps / per_epoch))
    train_levels, eval_levels, reused = (args.slice_levels if v == "L" else v for v in LEVELS.get(name, (1, 1, None)))
    checkpoint = (out / reused / f"seed{seed}" if reused else folder) / "model.pt"
    common = {"ckpt_path": checkpoint, "image_size": args.image_size, "batch_size": batch_size}
    seconds = 0.0
    if previous:  # trained and evaluated before; only the chain sets are new
        print(f"[{name}, seed {seed}] reused, evaluated on the chain cohort too", flush=True)
    elif reused:
        print(f"[{name}, seed {seed}] the checkpoint of {reused}, {eval_levels} level(s)", flush=True)
    else:
        print(f"[{name}, seed {seed}] {epochs} epochs x {per_epoch} steps, {train_levels} level(s)", flush=True)
        seconds = bundle(
            "training",
            ["configs/train.yaml", *overlays],
            folder / "train.log",
            datalist=datalist,
            output_dir=folder / "run",
            max_epochs=epochs,
            val_interval=max(1, epochs // 15),
            labelled_ratio=labelled_ratio,
            seed=seed,
            slice_levels=train_levels,
            **TRAINING_OVERRIDES.get(name, {}),
            **common,
        )
    result = previous or {
        "model": name,
        "description": description,
        "seed": seed,
        "epochs": epochs,
        "steps": epochs * per_epoch,
        "train_seconds": round(seconds, 1),
        "errors": {},
    }
    sets = {label: (data[eval_list], split, checkpoint) for label, (eval_list, split) in EVAL_SETS.items()}
    if previous:
        sets = {}
    if args.cohort:
        chain_checkpoint = calibrate_on_chain(args, overlays, checkpoint, folder, eval_levels)
        sets.update(
            {label: (Path(args.cohort), split, chain_checkpoint) for label, split in chain_sets(args.cohort).items()}
        )
    for label, (datalist_path, split, model) in sets.items():
        target = folder / f"eval_{label}"
        bundle(
            "evaluate",
            ["configs/train.yaml", *overlays, "configs/evaluate.yaml"],
            folder / f"eval_{label}.log",
            datalist=datalist_path,
            eval_split=split,
            output_dir=target,
            slice_levels=eval_levels,
            **{**common, "ckpt_path": model},
        )
        metrics = json.loads((target / "metrics.json").read_text())
        result[label] = {key: metrics[key] for key in ("n", "r", "mae", "r2", "rmse", "pad_mean", "pad_std")}
        for key in ("interval_coverage", "interval_width"):
            result[label][key] = metrics.get(key)
        rows = read_predictions(target / "predictions.csv")
        result["errors"][label] = {r["subject"]: abs(r["predicted_age"] - r["age"]) for r in rows}
        if eval_levels > 1:  # does the spread between levels flag the larger errors? (Spearman, over subjects)
            spread = [float(r["level_sd"]) for r in rows]
            error = [abs(r["predicted_age"] - r["age"]) for r in rows]
            result[label]["level_sd_mean"] = float(np.mean(spread))
            result[label]["level_sd_error_spearman"] = float(spearmanr(spread, error).statistic)
        if label.endswith("disease"):
            result[label]["survival"] = pad_outcome_association(rows, "survival_months", "brain_pad_corrected")
    print(json.dumps({k: v for k, v in result.items() if k != "errors"}), flush=True)
    write_json(folder / "result.json", result)
    return result


def calibrate_on_chain(args, overlays: list[str], checkpoint: Path, folder: Path, levels: int) -> Path:
    """A copy of the checkpoint whose interval is fitted on the chain cohort's calibration list (its bias correction
    stays the one training fitted); the model the chain sets are evaluated with."""
    import shutil

    from scripts.calibration import bias_correction_path, fit_from_predictions

    target = folder / "chain_calibrated" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, target)
    shutil.copy(bias_correction_path(checkpoint), bias_correction_path(target))
    bundle(
        "evaluate",
        ["configs/train.yaml", *overlays, "configs/evaluate.yaml"],
        folder / "chain_calibration.log",
        datalist=args.cohort,
        eval_split="calibration",
        output_dir=folder / "chain_calibration",
        ckpt_path=target,
        image_size=args.image_size,
        slice_levels=levels,
    )
    fit_from_predictions(
        folder / "chain_calibration" / "predictions.csv", target, correction_split=None, image_size=args.image_size
    )
    return target


def compare(results: list[dict], first: str, second: str, label: str) -> dict | None:
    """Paired comparison of two models on one evaluation set (negative difference: ``first`` is better)."""
    from scipy import stats

    runs = {(r["model"], r["seed"]): r for r in results}
    seeds = sorted(s for (m, s) in runs if m == first and (second, s) in runs)
    if not seeds:
        return None
    a = np.array([runs[first, s][label]["mae"] for s in seeds])
    b = np.array([runs[second, s][label]["mae"] for s in seeds])
    subjects = sorted(runs[first, seeds[0]]["errors"][label])
    per_a = np.array([np.mean([runs[first, s]["errors"][label][x] for s in seeds]) for x in subjects])
    per_b = np.array([np.mean([runs[second, s]["errors"][label][x] for s in seeds]) for x in subjects])
    t = stats.ttest_rel(a, b) if len(seeds) > 1 else None
    w = stats.wilcoxon(per_a, per_b)
    p_seeds = float(t.pvalue) if t is not None else math.nan
    return {
        "first": first,
        "second": second,
        "set": label,
        "seeds": seeds,
        "mae_first": [float(v) for v in a],
        "mae_second": [float(v) for v in b],
        "mean_difference": float((a - b).mean()),
        "paired_t_p_over_seeds": p_seeds,
        "n_subjects": len(subjects),
        "wilcoxon_p_over_subjects": float(w.pvalue),
        "significant": bool(p_seeds < 0.05 and float(w.pvalue) < 0.05),
    }


def _cell(values, spec=".2f") -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(float(np.mean(values)), spec)} ± {format(float(np.std(values, ddof=1)), spec)}"


def table(args, results: list[dict], comparisons: list[dict], floor: dict, truth: dict, minutes: float) -> str:
    lines = [
        "| model | seeds | research MAE | research r | clinical MAE | clinical r | PAD–survival r, disease | "
        "interval coverage, research / clinical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        runs = [r for r in results if r["model"] == name]
        if not runs:
            continue
        coverage = [
            _cell([100 * r[label]["interval_coverage"] for r in runs if r[label].get("interval_coverage")], ".0f")
            for label in ("research", "clinical")
        ]
        lines.append(
            f"| {MODELS[name][0]} | {len(runs)} | {_cell([r['research']['mae'] for r in runs])} | "
            f"{_cell([r['research']['r'] for r in runs])} | {_cell([r['clinical']['mae'] for r in runs])} | "
            f"{_cell([r['clinical']['r'] for r in runs])} | {_cell([r['disease']['survival']['r'] for r in runs])} | "
            f"{coverage[0]} % / {coverage[1]} % |"
        )
    lines.append(
        f"| *accuracy floor (knows brain age exactly)* | – | {floor['mae']:.2f} | {floor['r']:.2f} | "
        f"{floor['mae']:.2f} | {floor['r']:.2f} | {truth['sample_r']:.2f} (true δ) | – |"
    )
    spread = [
        name for name in args.models if any("level_sd_mean" in r["research"] for r in results if r["model"] == name)
    ]
    if spread:
        lines += [
            "",
            "| model | set | mean level sd (years) | Spearman ρ(level sd, absolute error) |",
            "|---|---|---|---|",
        ]
        for name in spread:
            runs = [r for r in results if r["model"] == name]
            for label in ("research", "clinical"):
                lines.append(
                    f"| {name} | {label} | {_cell([r[label]['level_sd_mean'] for r in runs])} | "
                    f"{_cell([r[label]['level_sd_error_spearman'] for r in runs])} |"
                )
    text = "\n".join(lines)
    if comparisons:
        text += (
            "\n\n| comparison | test set | MAE difference (first − second) | paired t over seeds, p | "
            "Wilcoxon over subjects, p | verdict |\n|---|---|---|---|---|---|\n"
        )
        for c in comparisons:
            verdict = (
                ("first better" if c["mean_difference"] < 0 else "second better")
                if c["significant"]
                else "no significant difference"
            )
            text += (
                f"| {c['first']} vs {c['second']} | {c['set']} | {c['mean_difference']:+.2f} | "
                f"{c['paired_t_p_over_seeds']:.3f} | {c['wilcoxon_p_over_subjects']:.3f} | {verdict} |\n"
            )
    settings = (
        f"{args.image_size}×{args.image_size} slices, {args.steps} optimizer steps per run, seeds "
        f"{', '.join(map(str, args.seeds))}, {args.n} healthy + {args.n // 5} disease phantom subjects "
        f"(phantom seed {args.phantom_seed})"
    )
    if any(name in LEVELS for name in args.models):
        settings += f", {args.slice_levels} axial levels {args.slice_level_spacing} grid slices apart"
    return text + f"\n\nMAE in years (mean ± sd over seeds). Settings: {settings}. Wall time {minutes:.0f} min.\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = make_data(args, out)
    record = json.loads((out / "phantom_research" / "phantom.json").read_text())
    floor = record["accuracy_floor"]
    truth = {"r": record["disease_true_pad_survival_r"], "sample_r": record["disease_sample_pad_survival_r"]}
    results = [train_and_evaluate(args, name, seed, data, out) for seed in args.seeds for name in args.models]
    comparisons = [
        c
        for first, second in PAIRS
        if first in args.models and second in args.models
        for label in [*EVAL_SETS, *chain_sets(args.cohort)]
        if not label.endswith("disease")
        for c in [compare(results, first, second, label)]
        if c
    ]
    minutes = (time.perf_counter() - start) / 60
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
        "settings": vars(args),
        "accuracy_floor": floor,
        "true_survival_association": truth,
        "results": results,
        "comparisons": comparisons,
        "minutes": round(minutes, 1),
    }
    write_json(out / "accuracy.json", report, default=str)
    text = table(args, results, comparisons, floor, truth, minutes)
    (out / "accuracy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
