"""The cohort report (scripts/report.py): what it flags, its rebuild command, and the page in a real browser."""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, predict

from scripts import report
from scripts.calibration import PredictionInterval, interval_path

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def report_run(run_workflow, trained_model, volume_dataset, tmp_path_factory):
    """``run inference`` on a labelled cohort of raw volumes through the chain (research and clinical grade, in
    groups, with an outcome), one missing and one unreadable file: the output folder and its rows."""
    root = tmp_path_factory.mktemp("report_run")
    datalist = json.loads((volume_dataset / "datalist.json").read_text())
    scans = [
        {**item, "image": str(volume_dataset / item["image"]), "group": split, "survival_months": 30.0 + 9 * i}
        for i, (split, item) in enumerate(
            (s, item) for s in ("training", "validation", "test", "disease") for item in datalist[s]
        )
    ]
    (root / "broken_T1w.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all"))
    scans += [
        {"image": str(root / "broken_T1w.nii.gz"), "subject": "sub-broken", "age": 50.0, "group": "test"},
        {"image": str(root / "absent_T1w.nii.gz"), "subject": "sub-absent", "age": 40.0, "group": "test"},
    ]
    (root / "cohort.json").write_text(json.dumps({"test": scans}))
    out = root / "out"
    rows = predict(run_workflow, trained_model, root / "cohort.json", out, input_splits=["test"])
    return out, {r["subject"]: r for r in rows}


def test_inference_writes_a_self_contained_report_of_every_scan(report_run, trained_model):
    out, rows = report_run
    page = (out / "report.html").read_text()
    assert len(rows) == 7 and sum(bool(r["error"]) for r in rows.values()) == 2
    assert "<h1>Brain-age report: 7 scans</h1>" in page
    for subject, row in rows.items():
        assert f">{subject}</td>" in page
        if row["error"]:
            assert html.escape(row["error"]) in page  # the reason, as the table gives it
    # the chain's registration of each raw scan is shown with it
    for record in (out / "preprocessed" / "records").glob("*.json"):
        record = json.loads(record.read_text())
        (line,) = [line for line in page.splitlines() if f">{record['subject']}</td>" in line]
        assert f">{record['registration']['template_correlation']:.2f}</td>" in line
    digest = hashlib.sha256(trained_model["ckpt_path"].read_bytes()).hexdigest()[:16]
    assert f"sha256 {digest}" in page
    # every image is inline: one QC picture per predicted scan, and the cohort figures (ages are known)
    assert page.count('<img class="slice"') == 5 and "src='data:image/png;base64," in page
    captions = re.findall("<figcaption>([^<]*)</figcaption>", page)
    assert [c.split(":")[0].split(" (")[0] for c in captions] == [
        "Predicted against chronological age",
        "Bland-Altman",
        "Brain-PAD distribution by grade",
        "Brain-PAD distribution by group",
        "Brain-PAD against survival",
    ]
    assert "n 5" in captions[0] and captions[-1].endswith("n 5")
    for reference in ("http://", "https://", 'src="//', "@import"):
        assert reference not in page


def test_the_report_flags_what_a_person_should_look_at(trained_model, slice_dataset, tmp_path):
    """A doubtful registration, a partial field of view, an atypical acquisition, spread levels, an age outside the
    calibration ages, a wide interval and a failure each raise their flag, and only on their scan."""
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    shutil.copy(trained_model["ckpt_path"], model)
    interval = PredictionInterval(
        coverage=0.9, lower=(-5.0, -9.0), upper=(5.0, 9.0), n=(40, 12), age_range=(20.0, 80.0)
    )
    interval.save(interval_path(model))
    base = {"predicted_age": 50.0, "predicted_age_lower": 45.0, "predicted_age_upper": 55.0}
    rows = {
        "plain": {"age": 52.0},
        "registration": {"age": 52.0},
        "field of view": {"age": 52.0},
        "quality": {"age": 52.0, "atypicality": 6.0},
        "levels": {"age": 52.0, "level_sd": 7.5},
        "age range": {"age": 85.0},
        "wide interval": {"age": 52.0, "predicted_age_lower": 38.0, "predicted_age_upper": 62.0},
        "failed": {"age": 52.0, "predicted_age": "", "error": "load: the slice is empty"},
    }
    # each scan as the chain leaves it: its slice, QC picture and record under OUT/preprocessed
    out = tmp_path / "out"
    for folder in ("slices", "qc", "records"):
        (out / "preprocessed" / folder).mkdir(parents=True)
    phantom_slice = sorted((slice_dataset / "slices").glob("*.nii.gz"))[0]
    correlation, in_view = {"registration": 0.41}, {"field of view": 0.9}
    for i, name in enumerate(rows):
        shutil.copy(phantom_slice, out / "preprocessed" / "slices" / f"scan{i}.nii.gz")
        record = {
            "source": f"raw/scan{i}.nii.gz",
            "registration": {"template_correlation": correlation.get(name, 0.85)},
            "brain_in_view": in_view.get(name, 1.0),
            "slice": f"slices/scan{i}.nii.gz",
        }
        (out / "preprocessed" / "records" / f"scan{i}.json").write_text(json.dumps(record))
        rows[name] |= {"image": record["source"], "qc": str(out / "preprocessed" / "qc" / f"scan{i}.png")}
    _write(out / "predictions.csv", [{**base, "subject": name, **values} for name, values in rows.items()])
    page = report.write_report(out, model).read_text()
    for name in rows:
        (line,) = [line for line in page.splitlines() if f">{name}</td>" in line]
        raised = [flag for flag in report.FLAGS if f">{flag}</span>" in line]
        assert raised == ([] if name == "plain" else [name]), name
    assert "load: the slice is empty" in page
    assert page.count('<img class="slice"') == len(rows) - 1  # every scan but the failed one, from its own slice
    assert "calibration ages 20-80" in page


def test_the_rebuild_command_help_and_one_line_errors(report_run, tmp_path):
    out, _ = report_run
    first = (out / "report.html").stat().st_mtime_ns
    rebuilt = subprocess.run(
        [sys.executable, "-m", "scripts.report", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == f"report -> {out / 'report.html'}"
    assert (out / "report.html").stat().st_mtime_ns > first
    page = (out / "report.html").read_text()
    assert "not given (python -m scripts.report OUT --ckpt_path MODEL describes it)" in page
    assert page.count('<img class="slice"') == 5

    shown = subprocess.run([sys.executable, "-m", "scripts.report", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert shown.returncode == 0 and "--ckpt_path" in shown.stdout and "--derivatives_dir" in shown.stdout
    empty = subprocess.run(
        [sys.executable, "-m", "scripts.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert empty.returncode == 2
    assert (
        empty.stderr.strip()
        .splitlines()[-1]
        .endswith("no predictions.csv to report on (run inference or evaluate first)")
    )
    assert "Traceback" not in empty.stderr


def _write(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# -- in a real browser --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by playwright (which downloads nothing: it is given the executable)."""
    if CHROMIUM is None:
        pytest.skip("chromium not on PATH (install.sh installs Debian's chromium as root)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield browser
        browser.close()


def _open(browser, path: Path):
    """A page with ``path`` loaded and scrolled through (its images are lazy), recording console errors, uncaught
    exceptions and every request."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    seen = {"errors": [], "requests": []}
    page.on("console", lambda message: message.type == "error" and seen["errors"].append(message.text))
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    page.on("request", lambda request: seen["requests"].append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    height = page.evaluate("document.body.scrollHeight")
    for y in range(0, height + 1000, 800):
        page.evaluate(f"window.scrollTo(0, {y})")
        page.wait_for_timeout(50)
    page.wait_for_load_state("networkidle")
    return page, seen


def test_the_report_in_headless_chromium(browser, report_run, tmp_path):
    out, rows = report_run
    page, seen = _open(browser, out / "report.html")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0])"
    )
    assert len(images) == 5 + 5 and all(loaded for _, loaded in images), images  # 5 scans, 5 cohort figures
    text = page.inner_text("#scans")
    for subject in rows:
        assert subject in text
    assert "not a readable NIfTI" in text and "absent_T1w.nii.gz" in page.content()
    assert seen["errors"] == []

    # sorting by brain-PAD orders the predicted rows by their PAD; the switch keeps the flagged rows only
    column = page.evaluate(
        "Array.from(document.querySelectorAll('#scans th')).findIndex(t => t.innerText === 'brain-PAD')"
    )
    page.click(f"#scans th:nth-child({column + 1})")
    pads = page.evaluate(
        f"Array.from(document.querySelectorAll('#scans tbody tr')).map(r => parseFloat(r.cells[{column}].dataset.v))"
    )
    known = [p for p in pads if p > -1e8]
    assert len(known) == 5 and known == sorted(known) and pads[:2] == [-1e9, -1e9]
    page.check("#flagged")
    shown = page.evaluate(
        "Array.from(document.querySelectorAll('#scans tbody tr')).filter(r => r.offsetParent !== null).length"
    )
    flagged = page.evaluate(
        "Array.from(document.querySelectorAll('#scans tbody tr')).filter(r => r.dataset.flags !== '0').length"
    )
    assert shown == flagged >= 2  # at least the two failed scans
    # printed: the controls go, and the page becomes a PDF
    page.emulate_media(media="print")
    assert page.evaluate("getComputedStyle(document.querySelector('.controls')).display") == "none"
    assert page.pdf()[:4] == b"%PDF"
    page.close()


def test_the_report_makes_no_network_request(browser, report_run):
    out, _ = report_run
    page, seen = _open(browser, out / "report.html")
    page.close()
    assert seen["requests"] and all(url.startswith(("file://", "data:")) for url in seen["requests"]), seen
