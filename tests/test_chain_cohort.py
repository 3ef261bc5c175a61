"""The benchmark cohort builder (tests/benchmarks/chain_cohort.py): raw phantom volumes through the real chain, once,
resumed after a kill without redoing finished scans."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib


def test_the_chain_cohort_builder_resumes_after_a_kill_and_writes_every_list(bundle_root, tmp_path):
    out = tmp_path / "cohort"
    sizes = ["--n_test", "1", "--n_rescan", "0", "--n_calibration", "0", "--n_disease", "1"]  # three scans
    command = [sys.executable, "tests/benchmarks/chain_cohort.py", "--out", str(out), "--skull_strip", "template"]
    command += ["--workers", "1", *sizes]
    records = out / "chain" / "records"
    with open(tmp_path / "first.log", "w") as log:  # killed, with its workers, once the first scan is done
        process = subprocess.Popen(command, cwd=bundle_root, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline and len(list(records.glob("*.json"))) < 1:
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    done_before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert 1 <= len(done_before) < 3 and not (out / "datalist.json").exists()

    result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in records.glob("*.json") if p.name in done_before} == done_before
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["this_run"]["scans_preprocessed"] == 3 - len(done_before)  # only what the kill left undone
    assert summary["lists"] == {
        "research_test": 1,
        "clinical_test": 1,
        "research_rescan": 0,
        "clinical_rescan": 0,
        "calibration": 0,
        "disease": 1,
    }
    datalist = json.loads((out / "datalist.json").read_text())
    research, clinical = datalist["research_test"][0], datalist["clinical_test"][0]
    assert research["subject"] == clinical["subject"] and (research["grade"], clinical["grade"]) == (
        "research",
        "clinical",
    )
    assert "survival_months" in datalist["disease"][0]
    for items in datalist.values():
        for item in items:
            assert nib.load(out / item["image"]).shape == (128, 128)
    assert summary["chain_seconds_per_scan"]["mean"] > 0

    again = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert (
        again.returncode == 0 and json.loads((out / "cohort.json").read_text())["this_run"]["scans_preprocessed"] == 0
    )


def test_the_chain_cohort_lists_hold_the_people_they_name():
    """Each list's people (without running the chain): the test split at both grades, its first people re-scanned,
    the calibration split at its own mixed grades, the disease cohort."""
    sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))
    import chain_cohort

    args = argparse.Namespace(n_test=3, n_rescan=2, n_calibration=4, n_disease=2)
    lists: dict[str, list] = {}
    for name, subject in chain_cohort.people(args):
        lists.setdefault(name, []).append(subject)
    assert {name: len(people) for name, people in lists.items()} == {
        "research_test": 3,
        "clinical_test": 3,
        "research_rescan": 2,
        "clinical_rescan": 2,
        "calibration": 4,
        "disease": 2,
    }
    ids = [s.subject for s in lists["research_test"]]
    assert [s.subject for s in lists["clinical_test"]] == ids
    assert [s.subject for s in lists["research_rescan"]] == [s.subject for s in lists["clinical_rescan"]] == ids[:2]
    assert {s.grade for s in lists["research_test"] + lists["research_rescan"]} == {"research"}
    assert {s.grade for s in lists["clinical_test"] + lists["clinical_rescan"]} == {"clinical"}
    assert {s.session for s in lists["research_rescan"] + lists["clinical_rescan"]} == {1}
    assert {s.session for s in lists["research_test"]} == {0}
    assert {s.split for s in lists["calibration"]} == {"calibration"}
    assert {s.cohort for s in lists["disease"]} == {"disease"} and all(s.survival_months for s in lists["disease"])
