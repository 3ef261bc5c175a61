"""Cohort report cost: the time to write ``report.html`` for 100 and 2,000 scans, its size, and how long headless
Chromium takes to open it and to load every picture.

    python tests/benchmarks/bench_report.py [--scans 100 2000] [--json OUT.json]

The rows are a labelled phantom cohort as ``run inference`` writes it for slice inputs (predicted age with its
interval, brain-PAD, quality scores, two grades); 100 distinct fast-path slices are reused cyclically, so each row
still decodes, draws and encodes its own picture. Writing runs on one core, as the report does after inference.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts import cli, phantom  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.report import write_report  # noqa: E402


def _cohort(out: Path, slices: list[dict], n: int) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        item = slices[i % len(slices)]
        predicted = item["age"] + rng.normal(0, 5)
        rows.append(
            {
                "subject": f"sub-{i:05d}",
                "image": item["image"],
                "predicted_age": f"{predicted:.3f}",
                "predicted_age_lower": f"{predicted - 9:.3f}",
                "predicted_age_upper": f"{predicted + 9:.3f}",
                "age": item["age"],
                "brain_pad": f"{predicted - item['age']:.3f}",
                "atypicality": f"{abs(rng.normal(2, 1)):.2f}",
                "grade": item["grade"],
                "error": "",
            }
        )
    out.mkdir(parents=True)
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _open_in_chromium(path: Path) -> dict | None:
    """Seconds to the load event, to page through the whole report with each screen's pictures drawn (they are
    lazy) and to sort by brain-PAD; None without chromium or playwright."""
    chromium = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        t0 = time.perf_counter()
        page.goto(path.as_uri(), wait_until="load")
        loaded = time.perf_counter() - t0
        height = page.evaluate("document.body.scrollHeight")
        in_view_drawn = (
            "Array.from(document.images).filter(i => { const r = i.getBoundingClientRect();"
            " return r.bottom > 0 && r.top < window.innerHeight; }).every(i => i.complete && i.naturalWidth > 0)"
        )
        for y in range(0, height, 1000):  # a reader paging down: each screen's pictures drawn before the next
            page.evaluate(f"window.scrollTo(0, {y})")
            page.wait_for_function(in_view_drawn, timeout=60_000)
        every = time.perf_counter() - t0
        screens = len(range(0, height, 1000))
        t0 = time.perf_counter()
        page.click("#scans th:nth-child(5)")  # sort by brain-PAD
        sort = time.perf_counter() - t0
        browser.close()
    return {
        "load_seconds": round(loaded, 2),
        "page_through_seconds": round(every, 2),
        "screens": screens,
        "sort_seconds": round(sort, 2),
    }


def main() -> None:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", type=int, nargs="+", default=[100, 2000], help="cohort sizes to report on")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    phantom._one_thread()
    result = {"machine": platform.processor() or platform.machine(), "cohorts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        spec = phantom.CohortSpec(n=100, n_disease=0, seed=0, grade="mixed")
        phantom.generate(spec, Path(tmp) / "phantom", mode="slices", progress=False)
        datalist = json.loads((Path(tmp) / "phantom" / "datalist.json").read_text())
        slices = [
            {**item, "image": str(Path(tmp) / "phantom" / item["image"])}
            for split in ("training", "validation", "test")
            for item in datalist[split]
            if "age" in item
        ]
        for n in args.scans:
            out = Path(tmp) / f"out{n}"
            _cohort(out, slices, n)
            t0 = time.perf_counter()
            path = write_report(out)
            seconds = time.perf_counter() - t0
            result["cohorts"][n] = {
                "write_seconds": round(seconds, 2),
                "ms_per_scan": round(1000 * seconds / n, 1),
                "megabytes": round(path.stat().st_size / 1e6, 2),
                "chromium": _open_in_chromium(path),
            }
            print(n, result["cohorts"][n], flush=True)
    result["command"] = "python tests/benchmarks/bench_report.py " + " ".join(sys.argv[1:])
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
