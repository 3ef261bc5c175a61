"""BIDS in (inference and training from a BIDS root) and BIDS derivatives out."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import predict

from scripts import bids, data, phantom

ROOT = Path(__file__).resolve().parents[1]
#: Where install.sh puts the BIDS validator (npm bids-validator 1.15.0); BIDS_VALIDATOR overrides it.
VALIDATOR = Path(os.environ.get("BIDS_VALIDATOR", ROOT / ".venv" / "node" / "node_modules" / ".bin" / "bids-validator"))


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def phantom_items(dataset: Path) -> list[dict]:
    return [
        {**it, "image": str(dataset / it["image"])}
        for items in json.loads((dataset / "datalist.json").read_text()).values()
        for it in items
    ]


@pytest.fixture(scope="module")
def bids_root(slice_dataset, volume_dataset, tmp_path_factory) -> Path:
    """sub-01 with two sessions (ses-2: acq-fast run-1 and, raw, run-2), sub-02 without an age, sub-03 not in
    participants.tsv, and a derivatives/ folder that must not be read as scans."""
    root = tmp_path_factory.mktemp("bids")
    slices = [it["image"] for it in phantom_items(slice_dataset)]
    raw = phantom_items(volume_dataset)[0]["image"]
    layout = {
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz": slices[0],
        "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-1_T1w.nii.gz": slices[1],
        "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-2_T1w.nii.gz": raw,
        "sub-02/anat/sub-02_T1w.nii.gz": slices[2],
        "sub-03/anat/sub-03_T1w.nii.gz": slices[3],
        "derivatives/other/sub-01/anat/sub-01_T1w.nii.gz": slices[4],
        "sub-02/anat/sub-02_T2w.nii.gz": slices[5],
    }
    for target, source in layout.items():
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / target)
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.10.0"}')
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\tsurvival_months\nsub-01\t60\tF\t31.5\nsub-02\tn/a\tM\tn/a\n"
    )
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t60.0\nses-2\t62.5\n")
    return root


def test_bids_items_identity_entities_and_ages(bids_root, caplog):
    with caplog.at_level(logging.WARNING):
        items = {it["subject"]: it for it in bids.bids_items(bids_root)}
    assert set(items) == {
        "sub-01_ses-1",
        "sub-01_ses-2_acq-fast_run-1",
        "sub-01_ses-2_acq-fast_run-2",
        "sub-02",
        "sub-03",
    }
    run2 = items["sub-01_ses-2_acq-fast_run-2"]
    assert (run2["participant_id"], run2["session_id"], run2["acq"], run2["run"]) == ("sub-01", "ses-2", "fast", "2")
    assert run2["age"] == 62.5 and items["sub-01_ses-1"]["age"] == 60.0  # sessions.tsv wins per session
    assert run2["sex"] == "F" and run2["survival_months"] == 31.5
    assert "age" not in items["sub-02"] and items["sub-02"]["sex"] == "M"
    assert "age" not in items["sub-03"] and "session_id" not in items["sub-03"]
    assert "1 participant(s) not listed (sub-03)" in caplog.text


def test_bids_root_without_participants_tsv_is_a_warning(bids_root, tmp_path, caplog):
    root = tmp_path / "bare"
    shutil.copytree(bids_root / "sub-02", root / "sub-02")
    with caplog.at_level(logging.WARNING):
        items = bids.bids_items(root)
    assert [it["subject"] for it in items] == ["sub-02"] and "age" not in items[0]
    assert "no participants.tsv" in caplog.text
    assert bids.is_bids_root(root) and not bids.is_bids_root(root / "sub-02")
    empty = tmp_path / "empty"
    (empty / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(bids.BidsError, match="no T1w images"):
        bids.bids_items(empty)


def _dataset(root: Path, scans: list[str], participants: str, sessions: dict[str, str] | None = None) -> Path:
    """A BIDS root of (empty: nothing here reads them) T1w files, with participants.tsv and sessions.tsv tables."""
    for scan in scans:
        path = root / scan
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (root / "dataset_description.json").write_text('{"Name": "ages", "BIDSVersion": "1.10.0"}')
    (root / "participants.tsv").write_text(participants)
    for pid, text in (sessions or {}).items():
        (root / pid / f"{pid}_sessions.tsv").write_text(text)
    return root


def test_a_session_without_an_age_does_not_take_the_participants_age(tmp_path, caplog):
    root = _dataset(
        tmp_path,
        [f"sub-01/ses-{s}/anat/sub-01_ses-{s}_T1w.nii.gz" for s in (1, 2, 3)],
        "participant_id\tage\tsurvival_months\nsub-01\t60\t31.5\n",
        {"sub-01": "session_id\tage\nses-1\t60\nses-2\tn/a\nses-3\tsoon\n"},
    )
    with caplog.at_level(logging.WARNING):
        items = {it["session_id"]: it for it in bids.bids_items(root)}
    assert items["ses-1"]["age"] == 60.0
    assert "age" not in items["ses-2"] and "age" not in items["ses-3"]  # never the baseline age of participants.tsv
    assert all(it["survival_months"] == 31.5 for it in items.values())  # the other columns still ride along
    sessions_tsv = root / "sub-01" / "sub-01_sessions.tsv"
    assert f"{sessions_tsv} (ses-2): age 'n/a'" in caplog.text
    assert f"{sessions_tsv} (ses-3): age 'soon' is not a number" in caplog.text


def test_several_sessions_without_session_ages_have_no_age(tmp_path, caplog):
    scans = [f"sub-01/ses-{s}/anat/sub-01_ses-{s}_T1w.nii.gz" for s in (1, 2)]
    scans += ["sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz"]
    scans += ["sub-03/ses-1/anat/sub-03_ses-1_run-1_T1w.nii.gz", "sub-03/ses-1/anat/sub-03_ses-1_run-2_T1w.nii.gz"]
    scans += ["sub-04/anat/sub-04_T1w.nii.gz"]
    root = _dataset(
        tmp_path,
        scans,
        "participant_id\tage\tgroup\nsub-01\t60\tA\nsub-02\t70\tB\nsub-03\t55\tC\nsub-04\t45\tD\n",
        # sub-02: a sessions.tsv with an age column that lists ses-1 only
        {"sub-01": "session_id\tsite\nses-1\tX\nses-2\tY\n", "sub-02": "session_id\tage\nses-1\t70\n"},
    )
    with caplog.at_level(logging.WARNING):
        items = {it["subject"]: it for it in bids.bids_items(root)}
    assert "age" not in items["sub-01_ses-1"] and "age" not in items["sub-01_ses-2"]
    assert items["sub-01_ses-2"]["site"] == "Y" and items["sub-01_ses-2"]["group"] == "A"
    assert items["sub-02_ses-1"]["age"] == 70.0 and "age" not in items["sub-02_ses-2"]
    # one session (two runs of it) or none: participants.tsv's age is that visit's
    assert items["sub-03_ses-1_run-1"]["age"] == items["sub-03_ses-1_run-2"]["age"] == 55.0
    assert items["sub-04"]["age"] == 45.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ["sub-01", "sub-02"]  # one warning per participant
    assert "add an age column to sub-01/sub-01_sessions.tsv" in warnings[0] and "ses-1, ses-2" in warnings[0]
    assert "for ses-2;" in warnings[1]


def test_a_censored_age_89_plus_is_no_age(tmp_path, caplog):
    root = _dataset(
        tmp_path,
        ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"],
        "participant_id\tage\nsub-01\t89+\nsub-02\t80\nsub-03\t88.9\n",
        {"sub-02": "session_id\tage\nses-1\t89+\n"},
    )
    with caplog.at_level(logging.WARNING):
        items = {it["participant_id"]: it for it in bids.bids_items(root)}
    assert "age" not in items["sub-01"] and "age" not in items["sub-02"] and items["sub-03"]["age"] == 88.9
    assert f"{root / 'participants.tsv'} (sub-01): age '89+' is censored" in caplog.text
    assert f"{root / 'sub-02' / 'sub-02_sessions.tsv'} (ses-1): age '89+' is censored" in caplog.text
    assert "not a number" not in caplog.text


def _people(n_labelled: int, n_unlabelled: int, scans: int = 2) -> list[dict]:
    items = []
    for p in range(n_labelled + n_unlabelled):
        for s in range(scans):
            item = {"image": f"/x/sub-{p:02d}_ses-{s}.nii.gz", "subject": f"sub-{p:02d}_ses-{s}"}
            item["participant_id"] = f"sub-{p:02d}"
            if p < n_labelled:
                item["age"] = 40.0 + p
            items.append(item)
    return items


def test_subject_level_split_is_deterministic_and_keeps_people_whole():
    items = _people(20, 4)
    split = bids.split_items(items, seed=3, fractions=(0.6, 0.2, 0.2))
    assert bids.split_items(items, seed=3, fractions=(0.6, 0.2, 0.2)) == split
    assert bids.split_items(items, seed=4, fractions=(0.6, 0.2, 0.2)) != split
    owners = {split_name: {it["participant_id"] for it in its} for split_name, its in split.items()}
    assert sum(len(p) for p in owners.values()) == 24  # every participant in exactly one split
    assert not (owners["training"] & owners["validation"] or owners["training"] & owners["test"])
    assert len(owners["validation"]) == 4 and len(owners["test"]) == 4 and len(owners["training"]) == 16
    # participants without an age only train the diffusion arm
    assert {f"sub-{p:02d}" for p in range(20, 24)} <= owners["training"]
    assert all("age" in it for s in ("validation", "test") for it in split[s])
    # small cohorts still get a validation and a test participant
    tiny = bids.split_items(_people(3, 0), seed=0)
    assert [len({it["participant_id"] for it in tiny[s]}) for s in ("training", "validation", "test")] == [1, 1, 1]
    with pytest.raises(bids.BidsError, match="three or four non-negative"):
        bids.split_items(items, fractions=(0.5, 0.5))
    # four fractions: a calibration split of labelled people too (the default), disjoint from the others
    four = bids.split_items(items, seed=3, fractions=(0.6, 0.15, 0.1, 0.15))
    people = {name: {it["participant_id"] for it in its} for name, its in four.items()}
    assert [len(people[s]) for s in ("training", "validation", "calibration", "test")] == [16, 3, 2, 3]
    assert sum(map(len, people.values())) == 24 and all("age" in it for it in four["calibration"])


def test_split_from_a_participants_column(caplog):
    items = _people(4, 0, scans=1)
    for item, value in zip(items, ["train", "Validation", "test", "holdout"]):
        item["group"] = value
    with caplog.at_level(logging.WARNING):
        split = bids.split_items(items, column="group")
    assert [[it["participant_id"] for it in split[s]] for s in ("training", "validation", "test")] == [
        ["sub-00"],
        ["sub-01"],
        ["sub-02"],
    ]
    assert "1 participant(s) without training/validation/test" in caplog.text


def test_datalist_leakage_is_checked_per_participant(tmp_path):
    path = tmp_path / "d.json"
    first = {"image": "a.nii.gz", "subject": "sub-01_ses-1", "participant_id": "sub-01", "age": 50}
    second = {"image": "b.nii.gz", "subject": "sub-01_ses-2", "participant_id": "sub-01", "age": 52}
    path.write_text(json.dumps({"training": [first], "test": [second]}))
    with pytest.raises(data.DatalistError, match="participant sub-01 is in both 'training' and 'test'"):
        data.load_datalist(path, check_files=False)
    # without participant_id, re-scans named the BIDS way are still one person
    del first["participant_id"], second["participant_id"]
    path.write_text(json.dumps({"training": [first], "test": [second]}))
    with pytest.raises(data.DatalistError, match="participant sub-01 is in both 'training' and 'test'"):
        data.load_datalist(path, check_files=False)
    # and the same image file under two ids in two splits is leakage too
    path.write_text(json.dumps({"training": [{**first, "subject": "x"}], "test": [{**first, "subject": "y"}]}))
    with pytest.raises(data.DatalistError, match="image .*a.nii.gz is in both 'training' and 'test'"):
        data.load_datalist(path, check_files=False)
    # different people stay apart: sub-01 and sub-010, and ids that only look alike
    other = {"image": "c.nii.gz", "subject": "sub-010_ses-1", "age": 40}
    path.write_text(json.dumps({"training": [first], "test": [other, {"image": "d.nii.gz", "subject": "sub-01x"}]}))
    assert len(data.load_datalist(path, check_files=False)["test"]) == 2


@pytest.fixture(scope="session")
def bids_validator():
    """``validate(path)``: the BIDS validator's issues on the dataset at ``path`` (``{"errors": [...], "warnings":
    [...]}``, issue keys, one per kind of issue; ``issues``: the full report). Skips without node or the validator."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the BIDS validator (npm bids-validator 1.15.0) cannot run")
    if not VALIDATOR.is_file():
        pytest.skip(
            f"{VALIDATOR}: no BIDS validator; ./install.sh installs it (npm bids-validator@1.15.0) when npm is there"
        )

    def validate(path: Path) -> dict:
        run = subprocess.run([node, str(VALIDATOR), str(path), "--json"], capture_output=True, text=True, timeout=300)
        assert run.stdout.strip(), f"bids-validator wrote no report (exit {run.returncode}): {run.stderr[-2000:]}"
        issues = json.loads(run.stdout)["issues"]
        report = {kind: [issue["key"] for issue in issues[kind]] for kind in ("errors", "warnings")}
        assert run.returncode == (1 if report["errors"] else 0), run.stderr[-2000:]
        return {**report, "issues": issues}

    return validate


def _issues(report: dict) -> str:
    """The validator's issues in a line each (key, reason, first files): an assertion message."""
    return "\n".join(
        f"{issue['key']}: {issue['reason']} {[(f.get('file') or {}).get('relativePath') for f in issue['files'][:3]]}"
        for kind in ("errors", "warnings")
        for issue in report["issues"][kind]
    )


def test_the_phantom_in_bids_mode_passes_the_bids_validator(bids_validator, tmp_path, caplog):
    out = tmp_path / "phantom"
    args = ["--out", str(out), "--n", "6", "--n_disease", "0", "--mode", "bids", "--grade", "mixed", "--seed", "5"]
    assert phantom.main([*args, "--quiet"]) == 0
    participants = read_tsv(out / "participants.tsv")
    assert {r["grade"] for r in participants} == {"research", "clinical"}
    assert "89+" in {r["age"] for r in participants}  # seed 5 has an 89.9-year-old: written censored
    report = bids_validator(out)
    assert report["errors"] == [], _issues(report)
    # left: the phantom varies voxel size and field of view between scans on purpose, and has one author entry
    assert set(report["warnings"]) <= {"INCONSISTENT_PARAMETERS", "TOO_FEW_AUTHORS"}, _issues(report)
    # datalist.json and phantom.json stay where the bundle reads them (in .bidsignore); the BIDS reader finds every
    # scan, and reads the censored age as no age
    datalist = json.loads((out / "datalist.json").read_text())
    with caplog.at_level(logging.WARNING):
        items = bids.bids_items(out)
    assert len(items) == sum(len(v) for v in datalist.values()) == 6
    assert "age '89+' is censored" in caplog.text
    assert json.loads((out / "phantom.json").read_text())["mode"] == "bids"


@pytest.fixture(scope="module")
def bids_inference(run_workflow, trained_model, bids_root, tmp_path_factory) -> tuple[Path, dict]:
    """``run inference`` on ``bids_root`` once: its output folder and its predictions.csv rows by subject."""
    out = tmp_path_factory.mktemp("bids_inference") / "out"
    return out, {r["subject"]: r for r in predict(run_workflow, trained_model, bids_root, out)}


def test_inference_on_a_bids_root_writes_predictions_and_derivatives(bids_inference):
    out, rows = bids_inference
    assert len(rows) == 5 and all(r["error"] == "" and float(r["predicted_age"]) > 0 for r in rows.values())
    run2 = rows["sub-01_ses-2_acq-fast_run-2"]
    assert float(run2["age"]) == 62.5
    assert float(run2["brain_pad"]) == pytest.approx(float(run2["predicted_age"]) - 62.5, abs=1e-3)
    assert rows["sub-02"]["age"] == "" and rows["sub-02"]["brain_pad"] == ""

    derivatives = out / "derivatives"
    description = json.loads((derivatives / "dataset_description.json").read_text())
    metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == metadata["name"]
    assert description["GeneratedBy"][0]["Version"] == metadata["version"]
    table = {(r["participant_id"], r["session_id"], r["run"]): r for r in read_tsv(derivatives / "brainage.tsv")}
    assert len(table) == 5
    row = table[("sub-01", "ses-2", "2")]
    assert row["source"] == "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-2_T1w.nii.gz"
    assert float(row["predicted_age"]) == pytest.approx(float(run2["predicted_age"]))
    assert table[("sub-02", "n/a", "n/a")]["age"] == "n/a" and table[("sub-02", "n/a", "n/a")]["brain_pad"] == "n/a"
    # the raw scan was preprocessed: its QC image is in the derivatives, under the subject and session
    assert row["qc"] == "sub-01/ses-2/figures/sub-01_ses-2_acq-fast_run-2_desc-brainage_T1w.png"
    assert (derivatives / row["qc"]).read_bytes()[:4] == b"\x89PNG"
    sidecar = json.loads((derivatives / "brainage.json").read_text())
    header = list(read_tsv(derivatives / "brainage.tsv")[0])
    assert list(sidecar) == header and sidecar["predicted_age"]["Units"] == "year"
    assert (derivatives / "README.md").is_file()
    ignored = [line for line in (derivatives / ".bidsignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored == ["/brainage.tsv", "/brainage.json", "figures/", "/report.html"]
    # the cohort report goes into the derivatives too, byte for byte the one in OUT
    assert (derivatives / "report.html").read_bytes() == (out / "report.html").read_bytes()


def test_the_bids_derivatives_pass_the_bids_validator(bids_validator, bids_inference):
    out, _ = bids_inference
    report = bids_validator(out / "derivatives")
    # bids-validator 1.x has no rules for derivatives: it validates a derivative dataset by the raw-dataset rules (and
    # skips a raw dataset's derivatives/ folder). The group table and the figures, which BIDS has no file rules for,
    # are in the derivatives' .bidsignore (as fMRIPrep lists its figures/); what is left is that no sub-* folder
    # holds raw data, which a derivatives dataset of reports never does.
    assert report["errors"] == ["SUBJECT_FOLDERS"], _issues(report)
    assert set(report["warnings"]) <= {"NO_AUTHORS"}, _issues(report)  # the authors are whoever ran the bundle


def test_training_from_a_bids_root_splits_by_participant_and_preprocesses(
    run_workflow, volume_dataset, tmp_path, tiny_network
):
    root = tmp_path / "bids"
    lines = ["participant_id\tage\tgroup"]
    for i, item in enumerate(phantom_items(volume_dataset)):
        target = root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_T1w.nii.gz"
        target.parent.mkdir(parents=True)
        shutil.copy(item["image"], target)
        lines.append(f"sub-{i:02d}\t{50 + 5 * i}\t{['training', 'training', 'training', 'validation', 'test'][i]}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    prepared = tmp_path / "prepared"
    run_workflow(
        "train.yaml",
        "training",
        datalist=str(root),
        split_column="group",
        preprocessed_dir=str(prepared),
        preprocess_workers=1,
        skull_strip="template",
        output_dir=str(tmp_path / "run"),
        ckpt_path=str(tmp_path / "model.pt"),
        max_epochs=1,
        batch_size=2,
        val_batch_size=2,
    )
    datalist = json.loads((prepared / "datalist.json").read_text())
    assert [sorted(it["participant_id"] for it in datalist[s]) for s in ("training", "validation", "test")] == [
        ["sub-00", "sub-01", "sub-02"],
        ["sub-03"],
        ["sub-04"],
    ]
    assert all((prepared / it["image"]).is_file() for s in ("training", "validation") for it in datalist[s])
    assert (tmp_path / "model.pt").is_file()


def test_sharded_bids_inference_merges_into_the_derivatives(run_workflow, trained_model, bids_root, tmp_path):
    import subprocess
    import sys

    derivatives = tmp_path / "elsewhere" / "brainage"
    for i in range(2):
        run_workflow(
            "inference.yaml",
            "inference",
            input=str(bids_root),
            output_dir=str(tmp_path / "out"),
            derivatives_dir=str(derivatives),
            ckpt_path=str(trained_model["ckpt_path"]),
            num_workers=1,
            skull_strip="template",
            shard=f"{i}/2",
        )
    assert not derivatives.exists()  # shards write no derivatives; the merge does, where they were asked for
    assert not (tmp_path / "out" / "report.html").exists()  # nor a report of their part
    merged = subprocess.run(
        [sys.executable, "-m", "scripts.merge", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True
    )
    assert merged.returncode == 0, merged.stderr
    table = read_tsv(derivatives / "brainage.tsv")
    assert sorted((r["participant_id"], r["session_id"], r["run"]) for r in table) == [
        ("sub-01", "ses-1", "n/a"),
        ("sub-01", "ses-2", "1"),
        ("sub-01", "ses-2", "2"),
        ("sub-02", "n/a", "n/a"),
        ("sub-03", "n/a", "n/a"),
    ]
    assert json.loads((derivatives / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    page = (derivatives / "report.html").read_text()
    assert (
        "Brain-age report: 5 scans" in page
        and f"sha256 {hashlib.sha256(trained_model['ckpt_path'].read_bytes()).hexdigest()[:16]}" in page
    )
