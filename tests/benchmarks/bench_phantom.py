"""Phantom generation speed: slices (fast path) and raw volumes on one core, including file writing, and the
quick start's embedded phantom as training generates it (two processes).

    python tests/benchmarks/bench_phantom.py --slices 200 --volumes 10 [--embedded] [--json OUT.json]

The fast path renders the raw volume's acquisition at the scanner voxels its slice needs and runs the chain's N4 on
the plane (docs/phantom.md), so it costs more than a plain render; the raw volume is rendered whole.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import cli  # noqa: E402
from scripts import phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402


def main() -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=200, help="subjects for the slice benchmark")
    p.add_argument("--volumes", type=int, default=10, help="subjects for the volume benchmark (half clinical)")
    p.add_argument("--embedded", action="store_true", help="also time the quick start's embedded phantom")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    phantom._one_thread()  # one core: torch, SimpleITK and BLAS
    t0 = time.perf_counter()
    phantom.build_atlas()
    result = {
        "atlas_seconds": round(time.perf_counter() - t0, 2),
        "machine": platform.processor() or platform.machine(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for mode, n, grade in (
            ("slices", args.slices, "research"),
            ("slices", args.slices, "clinical"),
            ("volumes", args.volumes, "mixed"),
        ):
            spec = phantom.CohortSpec(n=n, n_disease=0, seed=0, grade=grade)
            t0 = time.perf_counter()
            phantom.generate(spec, Path(tmp) / f"{mode}-{grade}", mode=mode, progress=False)
            seconds = time.perf_counter() - t0
            key = f"{mode}_{grade}"
            result[key] = {
                "subjects": n,
                "seconds": round(seconds, 2),
                "subjects_per_s": round(n / seconds, 2),
                "seconds_per_subject": round(seconds / n, 3),
            }
        if args.embedded:
            from scripts.data import embedded_phantom

            t0 = time.perf_counter()
            embedded_phantom(Path(tmp) / "embedded")
            summary = json.loads((Path(tmp) / "embedded" / "phantom.json").read_text())
            subjects = summary["spec"]["n"] + summary["spec"]["n"] // 5 + summary["spec"]["n_calibration"]
            result["embedded_phantom"] = {"subjects": subjects, "seconds": round(time.perf_counter() - t0, 1)}
    result["phantom_version"] = phantom.PHANTOM_VERSION
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
