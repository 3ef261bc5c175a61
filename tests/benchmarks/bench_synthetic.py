"""Phantom generation speed on one core: slices (fast path) and raw volumes, including file writing.

    python tests/benchmarks/bench_synthetic.py --slices 200 --volumes 10 [--json OUT.json]

Targets (issue 2): slices >= 20 subjects/s, raw volume <= 2 s each, one core.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import synthetic  # noqa: E402
from scripts.atomic import write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=200, help="subjects for the slice benchmark")
    p.add_argument("--volumes", type=int, default=10, help="subjects for the volume benchmark (half clinical)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    synthetic.build_atlas()
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
            spec = synthetic.CohortSpec(n=n, n_disease=0, seed=0, grade=grade)
            t0 = time.perf_counter()
            synthetic.generate(spec, Path(tmp) / f"{mode}-{grade}", mode=mode, progress=False)
            seconds = time.perf_counter() - t0
            key = f"{mode}_{grade}"
            result[key] = {
                "subjects": n,
                "seconds": round(seconds, 2),
                "subjects_per_s": round(n / seconds, 2),
                "seconds_per_subject": round(seconds / n, 3),
            }
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
