"""Preprocessing speed and accuracy per raw scan: phantom volumes through configs/preprocess.yaml.

    python tests/benchmarks/bench_preprocess.py --scans 6 [--workers 2] [--pose_deg 0] [--slice_levels 1] [--json OUT.json]

Generates ``--scans`` research-grade and ``--scans`` clinical-grade raw phantom volumes (with
``--pose_deg D``, each head is further turned by D degrees about a random axis and moved 30 mm),
then

* runs them one after another in this process (all cores), timing every stage of every scan and
  correlating each slice with the phantom's ground truth; the first scan, which also loads the
  template and starts ANTs, is reported on its own;
* runs them again into a fresh folder with ``--workers`` processes, for the throughput of a batch.

Target (issue 4): <= 10 s per raw scan end to end with the template mask on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from monai.bundle import ConfigParser  # noqa: E402

from scripts import cli  # noqa: E402
from scripts import phantom, preprocess  # noqa: E402
from scripts.atomic import write_json  # noqa: E402


def chain(skull_strip: str, hdbet_weights_dir: str | None, slice_levels: int = 1):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "preprocess.yaml"))
    parser.update({"skull_strip": skull_strip, "hdbet_weights_dir": hdbet_weights_dir, "slice_levels": slice_levels})
    return parser.get_parsed_content("preprocessing")


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def turn(path: Path, degrees: float, rng: np.random.Generator) -> None:
    """Rotate the head in the scanner by ``degrees`` about a random axis and move it 30 mm."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees) * rng.choice([-1, 1])
    pose = np.eye(4)
    pose[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    pose[:3, 3] = 30.0 * rng.normal(size=3) / np.sqrt(3)
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), pose @ image.affine, image.header), path)


def correlation(a: Path, b: str) -> float:
    """Of a written slice (its centre level) with the phantom's single-level ground truth."""
    written = nib.load(a).get_fdata()
    if written.ndim == 4:
        written = written[..., written.shape[-1] // 2]
    return float(np.corrcoef(written.ravel(), nib.load(b).get_fdata().ravel())[0, 1])


def summary(records: list[dict], walls: list[float], truths: list[str], out: Path) -> dict:
    """Failures, correlation of the slices with the phantom's truth, seconds per stage and in total."""
    ok = [(r, t) for r, t in zip(records, truths) if r["status"] == "ok"]
    r_truth = [correlation(out / r["slice"], t) for r, t in ok]
    stages = {s: round(float(np.mean([r["seconds"].get(s, 0.0) for r in records])), 3) for s in preprocess.STAGES}
    template = [r["registration"]["template_correlation"] for r, _ in ok]
    return {
        "scans": len(records),
        "failed": len(records) - len(ok),
        "r_truth_min": round(min(r_truth), 3) if ok else None,
        "r_truth_mean": round(float(np.mean(r_truth)), 3) if ok else None,
        "template_correlation_min": round(min(template), 3) if ok else None,
        "seconds_per_stage": stages,
        "seconds_total_mean": round(float(np.mean([r["seconds_total"] for r in records])), 2),
        "seconds_total_max": round(float(np.max([r["seconds_total"] for r in records])), 2),
        "wall_seconds_mean": round(float(np.mean(walls)), 2),
        "slice_file_kib_mean": (
            round(float(np.mean([(out / r["slice"]).stat().st_size for r, _ in ok])) / 1024, 1) if ok else None
        ),
    }


def main() -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=6, help="raw scans per acquisition grade")
    p.add_argument("--workers", type=int, default=2, help="worker processes for the batch throughput run")
    p.add_argument(
        "--skull_strip",
        default="template",
        choices=("template", "hdbet", "hdbet1", "auto", "none"),
        help="skull stripping",
    )
    p.add_argument("--hdbet_weights_dir", help="HD-BET weights for --skull_strip hdbet (default ~/hd-bet_params/...)")
    p.add_argument("--pose_deg", type=float, default=0.0, help="extra head rotation (degrees) about a random axis")
    p.add_argument("--seed", type=int, default=5, help="phantom seed")
    p.add_argument("--slice_levels", type=int, default=1, help="axial levels per scan (preprocessing slice_levels)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.scans < 2:
        p.error("--scans must be at least 2: the first scan of the run is reported on its own")
    result = {
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "skull_strip": args.skull_strip,
        "workers": args.workers,
        "pose_deg": args.pose_deg,
        "slice_levels": args.slice_levels,
    }
    rng = np.random.default_rng(args.seed)
    transform = chain(args.skull_strip, args.hdbet_weights_dir, args.slice_levels)
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for grade in ("research", "clinical"):
            spec = phantom.CohortSpec(n=args.scans, n_disease=0, seed=args.seed, grade=grade)
            phantom.generate(spec, Path(tmp) / grade, mode="volumes", progress=False)
            datalist = preprocess.read_datalist(Path(tmp) / grade / "datalist.json")
            items += [
                {**it, "grade": grade, "truth_slice": str(Path(tmp) / grade / it["truth_slice"])}
                for split in datalist.values()
                for it in split
            ]
        if args.pose_deg:
            for item in items:
                turn(Path(item["image"]), args.pose_deg, rng)
        sequential = Path(tmp) / "sequential"
        records, walls = [], []
        for item in items:
            t0 = time.perf_counter()
            records += preprocess.preprocess_items([item], sequential, transform, progress=False)
            walls.append(time.perf_counter() - t0)
        result["failures"] = [f"{r['source']}: {r['reason']}" for r in records if r["status"] != "ok"]
        truths = [it["truth_slice"] for it in items]
        result["first_scan"] = summary(records[:1], walls[:1], truths[:1], sequential)
        for grade in ("research", "clinical"):
            chosen = [i for i, it in enumerate(items) if it["grade"] == grade and i > 0]
            result[grade] = summary(
                [records[i] for i in chosen], [walls[i] for i in chosen], [truths[i] for i in chosen], sequential
            )
        t0 = time.perf_counter()
        preprocess.preprocess_items(items, Path(tmp) / "batch", transform, num_workers=args.workers, progress=False)
        batch = time.perf_counter() - t0
        result["batch"] = {
            "scans": len(items),
            "workers": args.workers,
            "wall_seconds": round(batch, 1),
            "wall_seconds_per_scan": round(batch / len(items), 2),
        }
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
