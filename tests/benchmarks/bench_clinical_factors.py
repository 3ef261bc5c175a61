"""Which part of a clinical-grade acquisition costs accuracy: the phantom's test people rendered research grade
with one clinical-grade factor at a time, predicted by trained models.

    .venv/bin/python tests/benchmarks/bench_clinical_factors.py --models runs/bench_levels/full/seed*/model.pt \
        --image_size 64 --json docs/benchmarks/clinical_factors.json
    .venv/bin/python tests/benchmarks/bench_clinical_factors.py --models ... --chain runs/factors_chain --people 30

The 90 test people of the accuracy benchmark's phantom (``CohortSpec(n=600, seed=0)``) are rendered with the
research grade's acquisition stream (same noise, pose and bias-field draws) in which one property takes its
clinical-grade value: Rician noise, bias field, thick slices, motion ghosting, contrast (gamma and tissue-intensity
jitter) or registration error; and with all of them (the clinical grade itself). Every model (``--models``, e.g. one
per seed) predicts every set through ``run inference``. Per factor: MAE (mean +/- sd over models), its excess over
research grade, and a Wilcoxon signed-rank test over people of the model-averaged absolute error against research
grade. The factors that cost most are the ones acquisition augmentation has to cover.

By default the sets are the phantom's fast path (``render_slice``, which reproduces what the chain makes of each
acquisition: ``tests/benchmarks/bench_fidelity.py``); with ``--chain WORK`` every set is rendered as raw volumes and
preprocessed by the real chain (cached in ``WORK``; about 10 s per scan here, so ``--people`` limits how many of the
test people are used).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import cli  # noqa: E402
from scripts import phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402

CLINICAL = phantom.GRADES["clinical"]
FACTORS = {  # name: the research-grade fields that take their clinical-grade value
    "research": (),
    "noise": ("noise",),
    "bias field": ("bias",),
    "thick slices": ("thickness_mm", "voxel_mm"),
    "motion ghosting": ("ghosting",),
    "contrast": ("gamma", "intensity_jitter"),
    "registration error": ("registration_error",),
    "clinical (all)": ("noise", "bias", "thickness_mm", "voxel_mm", "ghosting", "gamma", "intensity_jitter",
                       "registration_error"),
}  # fmt: skip


def render(out: Path, n: int, seed: int, people_limit: int | None = None, chain: bool = False) -> Path:
    """One datalist list per factor, the test people rendered with the research grade's stream (fast-path slices,
    or with ``chain`` raw volumes preprocessed by the real chain, cached under ``out``)."""
    research = phantom.GRADES["research"]
    people = [s for s in phantom.sample_cohort(phantom.CohortSpec(n=n, seed=seed)) if s.split == "test"]
    people = people[:people_limit]
    datalist, volumes = {}, []
    try:
        for factor, fields in FACTORS.items():
            # the research grade (so the research acquisition stream) with these fields made clinical
            phantom.GRADES["research"] = replace(research, **{f: getattr(CLINICAL, f) for f in fields})
            folder = factor.replace(" ", "_").replace("(", "").replace(")", "")
            datalist[folder] = []
            for person in people:
                path = out / folder / f"{person.subject}_{'T1w' if chain else 'slice'}.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                if chain:
                    if not path.is_file():
                        phantom.write_volume(person, path)
                    volumes.append({"image": str(path), "subject": f"{folder}/{person.subject}"})
                else:
                    phantom.write_slice(person, path)
                datalist[folder].append({"image": str(path), "subject": person.subject, "age": person.age})
    finally:
        phantom.GRADES["research"] = research
    if chain:
        from scripts.preprocess import load_chain, preprocess_items

        records = preprocess_items(volumes, out / "chain", load_chain(ROOT), num_workers=2)
        slices = {v["image"]: str(out / "chain" / r["slice"]) for v, r in zip(volumes, records) if r["status"] == "ok"}
        datalist = {
            k: [{**it, "image": slices[it["image"]]} for it in v if it["image"] in slices] for k, v in datalist.items()
        }
    path = out / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def predict(datalist: Path, out: Path, ckpt: Path, image_size: int) -> dict[str, dict[str, float]]:
    """``run inference`` on every factor's list: {factor folder: {subject: absolute error}}."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
        "--input", str(datalist), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--image_size", str(image_size),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    errors: dict[str, dict[str, float]] = {}
    with open(out / "predictions.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            errors.setdefault(row["split"], {})[row["subject"]] = abs(float(row["predicted_age"]) - float(row["age"]))
    return errors


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints (e.g. one per seed)")
    parser.add_argument("--image_size", type=int, default=128, help="the models' image_size")
    parser.add_argument("--n", type=int, default=600, help="phantom size (its test split is predicted)")
    parser.add_argument("--phantom_seed", type=int, default=0)
    parser.add_argument("--chain", default=None, metavar="WORK", help="raw volumes through the real chain, cached here")
    parser.add_argument("--people", type=int, default=None, help="only the first N test people")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from scipy.stats import wilcoxon

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.chain) if args.chain else Path(tmp) / "data"
        datalist = render(data, args.n, args.phantom_seed, args.people, chain=bool(args.chain))
        runs = [predict(datalist, Path(tmp) / f"pred{i}", Path(m), args.image_size) for i, m in enumerate(args.models)]
    names = {factor.replace(" ", "_").replace("(", "").replace(")", ""): factor for factor in FACTORS}
    subjects = sorted(runs[0]["research"])
    mean_error = {f: np.array([np.mean([run[f][s] for run in runs]) for s in subjects]) for f in names}
    rows = []
    for folder, factor in names.items():
        maes = [float(np.mean(list(run[folder].values()))) for run in runs]
        excess = [m - float(np.mean(list(run["research"].values()))) for m, run in zip(maes, runs)]
        p = float(wilcoxon(mean_error[folder], mean_error["research"]).pvalue) if folder != "research" else None
        rows.append({"factor": factor, "mae": maes, "excess": excess, "wilcoxon_p_vs_research": p})
    report = {
        "path": "raw volumes through the real chain" if args.chain else "fast path",
        "phantom_version": phantom.PHANTOM_VERSION,
        "models": args.models,
        "image_size": args.image_size,
        "people": len(subjects),
        "rows": rows,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    lines = ["| acquisition | MAE | excess over research | Wilcoxon p vs research |", "|---|---|---|---|"]
    for row in rows:
        mae, excess = np.array(row["mae"]), np.array(row["excess"])
        sd = lambda v: f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else ""  # noqa: E731
        p = "–" if row["wilcoxon_p_vs_research"] is None else f"{row['wilcoxon_p_vs_research']:.3g}"
        lines.append(f"| {row['factor']} | {mae.mean():.2f}{sd(mae)} | {excess.mean():+.2f}{sd(excess)} | {p} |")
    print("\n".join(lines))
    print(f"{len(args.models)} model(s), {len(subjects)} people, {report['minutes']} min")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
