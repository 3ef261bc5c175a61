"""The benchmark cohort that went through the real chain: a fixed phantom cohort as raw volumes, preprocessed once.

    .venv/bin/python tests/benchmarks/chain_cohort.py --out runs/chain_cohort [--workers 2]
    .venv/bin/python tests/benchmarks/chain_cohort.py --out runs/chain_cohort --shard 0/4   # one of 4 cluster jobs
    .venv/bin/python tests/benchmarks/chain_cohort.py --out runs/chain_cohort              # then: the datalist

The people are the embedded phantom's (``CohortSpec(n=600, seed=0, n_calibration=120)``: the quick start trains on
their fast-path slices), rendered as raw scanner-space volumes and preprocessed by the chain of
``configs/preprocess.yaml`` (ANTs affine, 130^3, N4, HD-BET, slice, scaling):

=====================  =====================================================================  =======
list                   who                                                                    default
=====================  =====================================================================  =======
``research_test``      the test split at research grade                                       90
``clinical_test``      the same people at clinical grade                                      90
``research_rescan``    the first of them re-scanned (``session 1``), research grade           60
``clinical_rescan``    the same re-scans at clinical grade                                    60
``calibration``        the calibration split (half clinical grade), for the interval          120
``disease``            the disease cohort (accelerated ageing, survival), research grade      72
=====================  =====================================================================  =======

Every volume is written once (atomically; an existing one is kept) and every scan is preprocessed once (the
chain's own cache: a record per scan), so a killed run resumes where it stopped and a rerun does nothing;
``--workers`` processes share the work, and ``--shard i/N`` takes every N-th scan for a cluster job. A run that
has every scan writes ``OUT/datalist.json`` (one list per row above; items with ``image``, ``subject``, ``age``,
``grade``, ``session``, ``survival_months``), ``OUT/manifest.csv`` and ``OUT/cohort.json`` (sizes and the chain's
cost: seconds per scan, measured here). Benchmarks take it with ``--cohort OUT/datalist.json``.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts import cli  # noqa: E402
from scripts import phantom, shards  # noqa: E402
from scripts.atomic import write_json  # noqa: E402

LISTS = {  # list: (split of the phantom, grade, session, size option)
    "research_test": ("test", "research", 0, "n_test"),
    "clinical_test": ("test", "clinical", 0, "n_test"),
    "research_rescan": ("test", "research", 1, "n_rescan"),
    "clinical_rescan": ("test", "clinical", 1, "n_rescan"),
    "calibration": ("calibration", None, 0, "n_calibration"),
    "disease": ("disease", None, 0, "n_disease"),
}


def people(args) -> list[tuple[str, phantom.Subject]]:
    """(list, subject as acquired for that list), in a fixed order."""
    cohort = phantom.sample_cohort(phantom.CohortSpec(n=600, seed=0, n_calibration=120))
    out = []
    for name, (split, grade, session, size) in LISTS.items():
        chosen = [s for s in cohort if s.split == split][: getattr(args, size)]
        out += [(name, replace(s, grade=grade or s.grade, session=session)) for s in chosen]
    return out


def volume_path(out: Path, name: str, subject: phantom.Subject) -> Path:
    return out / "volumes" / name / f"{subject.subject}_T1w.nii.gz"


def _write_volume(job) -> str:
    path, subject = job
    if not path.is_file():  # written atomically: a file that exists is complete
        phantom.write_volume(subject, path)
    return str(path)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "chain_cohort"), help="the cohort's folder")
    parser.add_argument("--workers", type=int, default=2, help="processes (each takes cpu_count / workers threads)")
    parser.add_argument("--shard", default=None, help="i/N: only shard i (0-based) of N of the scans")
    parser.add_argument("--skull_strip", default="auto", help="the chain's skull_strip (auto: HD-BET)")
    for name, default in (("n_test", 90), ("n_rescan", 60), ("n_calibration", 120), ("n_disease", 72)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    part = shards.parse_shard(args.shard)
    out = Path(args.out)
    start = time.perf_counter()
    jobs = [(name, subject, volume_path(out, name, subject)) for name, subject in people(args)]
    mine = [job for i, job in enumerate(jobs) if part is None or i % part.count == part.index]

    phantom.build_atlas()  # once, before the workers fork
    todo = [(path, subject) for _, subject, path in mine if not path.is_file()]
    t0 = time.perf_counter()
    if todo:
        with multiprocessing.get_context("fork").Pool(args.workers, initializer=phantom._one_thread) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write_volume, todo), 1):
                print(f"\rvolumes {done}/{len(todo)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    volume_seconds = time.perf_counter() - t0

    from scripts.preprocess import load_chain, preprocess_items, write_manifest

    items = [{"image": str(path), "subject": f"{name}/{subject.subject}"} for name, subject, path in mine]
    records = preprocess_items(items, out / "chain", load_chain(ROOT, skull_strip=args.skull_strip), args.workers)
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        print(f"failed: {r['source']}: {r['reason']}", file=sys.stderr)
    if part is not None:
        print(f"shard {args.shard}: {len(records) - len(failed)} scans ok, {len(failed)} failed; rerun without --shard")
        return 0

    datalist: dict[str, list] = {name: [] for name in LISTS}
    for (name, subject, _), record in zip(jobs, records):
        if record["status"] != "ok":
            continue
        item = {"image": f"chain/{record['slice']}", "subject": subject.subject, "age": subject.age}
        item.update(grade=subject.grade, session=subject.session, brain_age=subject.brain_age)
        if subject.survival_months is not None:
            item["survival_months"] = subject.survival_months
        datalist[name].append(item)
    write_json(out / "datalist.json", datalist)
    write_manifest(out / "manifest.csv", records)
    fresh = [r for r in records if not r.get("cached") and r["status"] == "ok"]
    summary = {
        "lists": {name: len(items) for name, items in datalist.items()},
        "failed": [{"scan": r["subject"], "reason": r["reason"]} for r in failed],
        "skull_strip": sorted({r.get("skull_strip", "") for r in records if r["status"] == "ok"}),
        "chain_seconds_per_scan": {  # measured by the chain itself, per scan and stage
            "mean": sum(r["seconds_total"] for r in records if r["status"] == "ok") / max(len(records), 1),
            "stages": {
                stage: sum(r["seconds"].get(stage, 0.0) for r in records) / max(len(records), 1)
                for stage in ("load", "register", "resample", "n4", "skull_strip", "slice", "write")
            },
            "workers": args.workers,
        },
        "this_run": {
            "scans_preprocessed": len(fresh),
            "volumes_written": len(todo),
            "volume_seconds": round(volume_seconds, 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
        },
        "command": "python tests/benchmarks/chain_cohort.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(out / "cohort.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
