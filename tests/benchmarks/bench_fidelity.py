"""Fidelity of the phantom's fast path: the same people as raw volumes through the real chain and through the fast
path, compared slice against slice and, with trained models, age against age.

    .venv/bin/python tests/benchmarks/bench_fidelity.py --n 24 --work runs/fidelity \
        [--ckpt models/model.pt ...] [--image_size 128] [--json docs/benchmarks/fidelity.json]

``--n`` people of ``CohortSpec(seed=--seed)`` are rendered at research grade and at clinical grade, twice each:

* as raw scanner-space volumes (``--mode volumes``), preprocessed by the real chain of ``configs/preprocess.yaml``
  (ANTs affine, 130^3, N4, HD-BET, slice, scaling; cached under ``--work``, so a rerun only renders the fast path);
* through the fast path (``render_slice``), in this process.

With ``--cohort runs/chain_cohort/datalist.json`` the people are instead the chain cohort's test people
(``tests/benchmarks/chain_cohort.py``: the embedded phantom's test split, already through the chain), so nothing is
preprocessed again; the registration error is then not reported.

Per person and grade, model-free (inside the brain, the intersection of the two slices' supports):

* ``pixel_r``: Pearson r of the two slices' intensities;
* ``histogram_distance``: Wasserstein-1 distance between the two slices' brain-intensity distributions ([0, 1] units);
* ``sharpness_ratio``: mean gradient magnitude (fast / chain);
* ``noise_ratio``: Immerkaer's noise estimate (fast / chain);
* ``quality`` of each (:mod:`scripts.quality`) and the brain masks' Dice;
* ``registration``: the chain's registration error, the mean displacement (mm) over the template brain of the
  estimated MNI->scan map against the true pose, and its rotation (degrees) and scale.

With ``--ckpt`` (models trained on fast-path slices), each model predicts both renders (``run inference``): per
grade the mean absolute age difference chain - fast, its mean (bias), their Pearson r, each path's MAE and bias and,
where the model has its interval file beside it, each path's interval coverage and mean width; and where in the
slice the age gap sits (``gap_by_region``): integrated gradients of the model's age along the straight line from the
fast-path slice to the chain's (16 steps) split the gap of each person exactly into pixels, summed over the brain's
rim (within 3 pixels of either slice's mask edge) and the interior. The summary gives mean and min (or max) per
grade, and the targets of the fidelity issue.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import cli  # noqa: E402
from scripts import mni, phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.quality import slice_agreement, slice_quality  # noqa: E402
from scripts.slices import slice_nifti  # noqa: E402

GRADES = ("research", "clinical")
TARGETS = {  # the fidelity issue's targets per grade
    "research": {"pixel_r_mean": 0.97, "pixel_r_min": 0.93, "age_difference": 1.5},
    "clinical": {"pixel_r_mean": 0.95, "pixel_r_min": 0.90, "age_difference": 2.5},
    "age_bias": 1.0,
    "age_r": 0.97,
}


def chain_slices(work: Path, grade: str, n: int, seed: int, workers: int, skull_strip: str) -> dict[str, dict]:
    """The people's raw volumes through the real chain (cached): {subject: {"slice": path, "registration": qc}}."""
    from scripts.preprocess import load_chain, preprocess_items

    volumes = work / grade / "volumes"
    spec = phantom.CohortSpec(n=n, seed=seed, grade=grade, n_disease=0, val_fraction=0.0, test_fraction=0.0)
    datalist = phantom.ensure_dataset(volumes, spec, mode="volumes", workers=workers)
    items = [
        {"image": str(volumes / it["image"]), "subject": it["subject"]}
        for it in json.loads(Path(datalist).read_text())["training"]
    ]
    chain = load_chain(ROOT, skull_strip=skull_strip)
    records = preprocess_items(items, work / grade / "chain", chain, num_workers=workers)
    out = {}
    for item, record in zip(items, records):
        if record["status"] != "ok":
            print(f"{grade} {item['subject']}: the chain failed ({record['reason']})", file=sys.stderr)
            continue
        out[item["subject"]] = {
            "slice": work / grade / "chain" / record["slice"],
            "registration": record.get("registration", {}),
            "seconds": record.get("seconds_total"),
        }
    return out


def cohort_slices(cohort: Path, grade: str) -> tuple[dict[str, dict], dict[str, phantom.Subject]]:
    """The chain cohort's test people at ``grade`` (``chain_cohort.py``, already through the chain) and who they are."""
    items = json.loads(cohort.read_text())[f"{grade}_test"]
    spec = phantom.CohortSpec(n=600, seed=0, n_calibration=120)  # as chain_cohort.people draws them
    people = {s.subject: replace(s, grade=grade) for s in phantom.sample_cohort(spec)}
    return {it["subject"]: {"slice": cohort.parent / it["image"], "registration": {}} for it in items}, people


def registration_error(subject: phantom.Subject, qc: dict) -> dict:
    """The chain's estimated MNI -> scan map against the true pose: displacement over the brain, rotation, scale."""
    if "template_to_scan" not in qc:
        return {}
    pose = phantom.draw_acquisition(subject).pose
    error = np.linalg.inv(pose) @ np.asarray(qc["template_to_scan"])  # MNI -> MNI; the identity when perfect
    brain = np.argwhere(mni.grid_to_template_mask())
    points = brain @ mni.grid_affine()[:3, :3].T + mni.grid_affine()[:3, 3]
    moved = points @ error[:3, :3].T + error[:3, 3]
    u, singular, vt = np.linalg.svd(error[:3, :3])
    rotation = u @ vt
    angle = float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
    return {
        "displacement_mm": float(np.linalg.norm(moved - points, axis=1).mean()),
        "rotation_deg": angle,
        "scale": float(np.prod(singular) ** (1 / 3)),
        "matrix": np.round(error, 5).tolist(),
    }


def compare(chain: np.ndarray, fast: np.ndarray) -> dict:
    return {**slice_agreement(chain, fast), "quality_chain": slice_quality(chain), "quality_fast": slice_quality(fast)}


def predict(datalist: Path, out: Path, ckpt: Path, image_size: int) -> dict[str, tuple[float, float, float]]:
    """``run inference`` of one model: {"<list>/<subject>": (predicted age, interval lower, upper)}; the interval is
    NaN without an interval file beside the checkpoint."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
        "--input", str(datalist), "--output_dir", str(out), "--ckpt_path", str(ckpt), "--image_size", str(image_size),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    with open(out / "predictions.csv", newline="") as fh:
        return {
            f"{r['split']}/{r['subject']}": tuple(
                float(r[key] or "nan") for key in ("predicted_age", "predicted_age_lower", "predicted_age_upper")
            )
            for r in csv.DictReader(fh)
        }


def age_agreement(chain: np.ndarray, fast: np.ndarray, age: np.ndarray) -> dict:
    """Columns of ``chain`` and ``fast``: predicted age, interval lower, interval upper (one row per person)."""
    coverage = {
        f"{key}_{path}": value
        for path, rows in (("chain", chain), ("fast", fast))
        for key, value in (
            ("coverage", float(np.mean((rows[:, 1] <= age) & (age <= rows[:, 2])))),
            ("interval_width", float(np.mean(rows[:, 2] - rows[:, 1]))),
        )
        if np.isfinite(rows[:, 1:]).all()
    }
    chain, fast = chain[:, 0], fast[:, 0]
    difference = chain - fast
    return {
        "mean_abs_difference": float(np.abs(difference).mean()),
        "max_abs_difference": float(np.abs(difference).max()),
        "bias": float(difference.mean()),
        "r": float(np.corrcoef(chain, fast)[0, 1]),
        "mae_chain": float(np.abs(chain - age).mean()),
        "mae_fast": float(np.abs(fast - age).mean()),
        "bias_chain": float((chain - age).mean()),
        "bias_fast": float((fast - age).mean()),
        **coverage,
    }


RIM_PIXELS = 3  # the brain's rim, in pixels from either slice's mask edge, for gap_by_region


def gap_by_region(network, chain: np.ndarray, fast: np.ndarray, steps: int = 16) -> dict:
    """Where the age gap chain - fast sits in the slice: integrated gradients (Sundararajan et al. 2017) of the
    model's age along ``fast + t (chain - fast)``, summed per person over the rim and the interior (mean years).

    ``network``: a model of :func:`scripts.analysis.load_model` (fp32, eval); ``chain``/``fast``: (N, H, W)
    model-input slices of the same people. The two parts add up to the gap the model
    gives (up to the midpoint rule's error over ``steps``), so a gap of bias can be traced to the mask's edge or to the
    tissue it holds.
    """
    import torch
    from scipy import ndimage

    start, delta = torch.from_numpy(fast[:, None]), torch.from_numpy((chain - fast)[:, None])
    gradient = torch.zeros_like(start)
    for t in (np.arange(steps) + 0.5) / steps:
        x = (start + float(t) * delta).requires_grad_(True)
        network(x).sum().backward()
        gradient += x.grad / steps
    attribution = (gradient * delta)[:, 0].numpy()
    depth = [
        np.minimum(ndimage.distance_transform_edt(c > 0), ndimage.distance_transform_edt(f > 0))
        for c, f in zip(chain, fast)
    ]
    rim = np.stack([(d <= RIM_PIXELS) & ((c > 0) | (f > 0)) for d, c, f in zip(depth, chain, fast)])
    return {
        "total": float(attribution.sum((1, 2)).mean()),
        "rim": float(np.where(rim, attribution, 0).sum((1, 2)).mean()),
        "interior": float(np.where(rim, 0, attribution).sum((1, 2)).mean()),
    }


def summarise(people: list[dict]) -> dict:
    summary = {}
    for key in ("pixel_r", "histogram_distance", "sharpness_ratio", "noise_ratio", "mask_dice"):
        values = np.array([p[key] for p in people])
        summary[key] = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    for key in ("displacement_mm", "rotation_deg", "scale"):
        values = np.array([p["registration"][key] for p in people if p["registration"]])
        if len(values):
            summary[f"registration_{key}"] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1))}
    for path in ("chain", "fast"):
        values = np.array([p[f"quality_{path}"] for p in people])
        summary[f"quality_{path}"] = {
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="people, each at research and at clinical grade")
    parser.add_argument("--seed", type=int, default=11, help="the people (not the training phantom's seed 0)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "fidelity"), help="volumes and chain outputs (cached)")
    parser.add_argument("--workers", type=int, default=2, help="chain processes")
    parser.add_argument("--skull_strip", default="auto", help="the chain's skull_strip (auto: HD-BET)")
    parser.add_argument("--ckpt", nargs="*", default=[], help="models trained on fast-path slices")
    parser.add_argument("--image_size", type=int, default=128, help="the models' image_size")
    parser.add_argument(
        "--cohort", default=None, help="take the people and their chain slices from this chain cohort's test lists"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--figure", default=None, help="draw three people of each grade, chain and fast, here (PNG)")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(args.work).resolve()
    results: dict = {"phantom_version": phantom.PHANTOM_VERSION, "grades": {}, "models": {}}
    datalist: dict[str, list] = {}
    truth: dict[str, dict[str, float]] = {}
    for grade in GRADES:
        if args.cohort:
            chained, people = cohort_slices(Path(args.cohort).resolve(), grade)
        else:
            chained = chain_slices(work, grade, args.n, args.seed, args.workers, args.skull_strip)
            spec = phantom.CohortSpec(
                n=args.n, seed=args.seed, grade=grade, n_disease=0, val_fraction=0, test_fraction=0
            )
            people = {s.subject: s for s in phantom.sample_cohort(spec)}
        rows, t0 = [], time.perf_counter()
        for subject, chain in sorted(chained.items()):
            person = people[subject]
            fast = phantom.render_slice(person)
            fast_path = work / grade / "fast" / f"{subject}_slice.nii.gz"
            fast_path.parent.mkdir(parents=True, exist_ok=True)
            slice_nifti(fast).to_filename(fast_path)
            chain_image = np.asarray(nib.load(chain["slice"]).dataobj, dtype=np.float32)
            rows.append(
                {
                    "subject": subject,
                    "age": person.age,
                    "brain_age": person.brain_age,
                    **compare(chain_image, fast[0]),
                    "registration": registration_error(person, chain["registration"]),
                }
            )
            for path, image in (("chain", chain["slice"]), ("fast", fast_path)):
                datalist.setdefault(f"{grade}_{path}", []).append(
                    {"image": str(image), "subject": subject, "age": person.age}
                )
            truth.setdefault(grade, {})[subject] = person.age
        seconds_fast = (time.perf_counter() - t0) / max(len(rows), 1)
        results["grades"][grade] = {"people": rows, "summary": summarise(rows), "fast_seconds_per_slice": seconds_fast}
    (work / "datalist.json").write_text(json.dumps(datalist))
    if args.figure:
        from scripts.figures import paired_slices

        shown = []
        for grade in GRADES:
            for item, fast in list(zip(datalist[f"{grade}_chain"], datalist[f"{grade}_fast"]))[:3]:
                images = [np.asarray(nib.load(i["image"]).dataobj, dtype=np.float32) for i in (item, fast)]
                shown.append((f"{grade} {item['subject']}", *images))
        paired_slices(shown, args.figure, names=("chain", "fast path"))
    for ckpt in map(Path, args.ckpt):
        from scripts.analysis import load_model

        network, _ = load_model(ROOT / "configs" / "inference.yaml", ckpt, device="cpu")  # the config's image_size
        network.float().eval()
        ages = predict(work / "datalist.json", work / "predictions" / ckpt.parent.name, ckpt, args.image_size)
        results["models"][str(ckpt)] = {}
        for grade in GRADES:
            subjects = sorted(truth[grade])
            chain = np.array([ages[f"{grade}_chain/{s}"] for s in subjects])
            fast = np.array([ages[f"{grade}_fast/{s}"] for s in subjects])
            age = np.array([truth[grade][s] for s in subjects])
            results["models"][str(ckpt)][grade] = age_agreement(chain, fast, age)
            images = {
                path: np.stack(
                    [np.asarray(nib.load(i["image"]).dataobj, dtype=np.float32) for i in datalist[f"{grade}_{path}"]]
                )
                for path in ("chain", "fast")
            }
            results["models"][str(ckpt)][grade]["gap_by_region"] = gap_by_region(
                network, images["chain"], images["fast"]
            )
    results["targets"] = TARGETS
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["command"] = "python tests/benchmarks/bench_fidelity.py " + " ".join(sys.argv[1:])
    shown = {
        "grades": {
            g: r["summary"] | {"fast_seconds_per_slice": r["fast_seconds_per_slice"]}
            for g, r in results["grades"].items()
        },
        "models": results["models"],
    }
    print(json.dumps(shown, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
