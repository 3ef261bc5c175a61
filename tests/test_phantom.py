"""The synthetic ageing-brain phantom: files, labels, the ageing signal, determinism, errors."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from skimage.filters import threshold_multiotsu

from scripts import mni, phantom


def read_participants(folder):
    with open(folder / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_slice_dataset_files_and_labels(slice_dataset):
    datalist = json.loads((slice_dataset / "datalist.json").read_text())
    rows = {r["participant_id"]: r for r in read_participants(slice_dataset)}
    assert set(datalist) == {"training", "validation", "calibration", "test", "disease"}
    assert [len(datalist[k]) for k in ("training", "validation", "calibration", "test", "disease")] == [28, 6, 12, 6, 8]
    assert len(rows) == 60
    # the calibration split: labelled healthy people of both grades, who are nobody else
    calibration = datalist["calibration"]
    assert all("age" in it for it in calibration) and {it["grade"] for it in calibration} == {"research", "clinical"}
    assert {it["subject"] for it in calibration}.isdisjoint(
        it["subject"] for k in datalist if k != "calibration" for it in datalist[k]
    )
    unlabelled = [it for it in datalist["training"] if "age" not in it]
    assert len(unlabelled) == 7  # 25 % of the 28 training scans
    for split, items in datalist.items():
        for it in items:
            row = rows[it["subject"]]
            assert row["split"] == split
            assert (slice_dataset / it["image"]).is_file()
            if "age" in it:
                assert it["age"] == pytest.approx(float(row["age"]))
            assert "brain_age" not in it  # the truth never leaks into the datalist
            assert float(row["delta"]) == pytest.approx(float(row["brain_age"]) - float(row["age"]), abs=0.02)
    assert all("survival_months" in it for it in datalist["disease"])
    img = nib.load(slice_dataset / datalist["test"][0]["image"])
    data = img.get_fdata(dtype=np.float32)
    assert data.shape == (128, 128)
    assert data.min() == 0.0 and data.max() == 1.0
    np.testing.assert_allclose(img.affine, mni.slice_affine(), atol=1e-4)
    summary = json.loads((slice_dataset / "phantom.json").read_text())
    assert summary["accuracy_floor"]["mae"] == pytest.approx(phantom.accuracy_floor()["mae"])


def csf_fraction(image: np.ndarray) -> float:
    """Label-free image measure: share of brain pixels in the darkest of three intensity classes."""
    brain = image > 0.02
    threshold = threshold_multiotsu(image[brain], classes=3)[0]
    return float((image[brain] < threshold).mean())


def test_csf_fraction_tracks_brain_age():
    subjects = phantom.sample_cohort(phantom.CohortSpec(n=80, seed=11, n_disease=0))
    measure = [csf_fraction(phantom.render_slice(s)[0]) for s in subjects]
    brain_age = [s.brain_age for s in subjects]
    r = np.corrcoef(measure, brain_age)[0, 1]
    assert r > 0.8, r


def test_image_depends_on_brain_age_not_chronological_age():
    s = phantom.sample_cohort(phantom.CohortSpec(n=2, seed=5))[0]
    base = phantom.render_slice(s)
    np.testing.assert_array_equal(base, phantom.render_slice(replace(s, age=s.age + 30)))
    older = phantom.render_slice(replace(s, brain_age=s.brain_age + 30))
    assert csf_fraction(older[0]) > csf_fraction(base[0]) + 0.03


def test_deterministic_and_grade_independent_anatomy():
    spec = phantom.CohortSpec(n=12, seed=2)
    a, b = phantom.sample_cohort(spec), phantom.sample_cohort(spec)
    assert a == b
    np.testing.assert_array_equal(phantom.render_slice(a[0]), phantom.render_slice(b[0]))
    other = phantom.sample_cohort(replace(spec, seed=3))
    assert [s.age for s in other] != [s.age for s in a]
    clinical = phantom.sample_cohort(replace(spec, grade="clinical"))
    assert [(s.age, s.brain_age, s.split) for s in clinical] == [(s.age, s.brain_age, s.split) for s in a]
    research_img, clinical_img = phantom.render_slice(a[0])[0], phantom.render_slice(clinical[0])[0]
    truth = phantom.render_slice(a[0], acquire=False)[0]
    # Same person on two scanners: both resemble the truth, the clinical scan less so.
    r_research = np.corrcoef(research_img.ravel(), truth.ravel())[0, 1]
    r_clinical = np.corrcoef(clinical_img.ravel(), truth.ravel())[0, 1]
    assert r_research > 0.97 and 0.7 < r_clinical < r_research


def test_a_rescan_is_the_same_person_with_a_fresh_acquisition():
    spec = phantom.CohortSpec(n=6, seed=2)
    first, again = phantom.sample_cohort(spec), phantom.sample_cohort(replace(spec, session=1))
    assert [(s.age, s.brain_age, s.split, s.seed) for s in again] == [
        (s.age, s.brain_age, s.split, s.seed) for s in first
    ]
    scan, rescan = phantom.render_slice(first[0])[0], phantom.render_slice(again[0])[0]
    truth = phantom.render_slice(first[0], acquire=False)[0]
    assert not np.array_equal(scan, rescan)  # new noise, pose and bias field
    assert np.corrcoef(scan.ravel(), rescan.ravel())[0, 1] > 0.95  # ... of the same brain
    assert np.corrcoef(rescan.ravel(), truth.ravel())[0, 1] > 0.97
    # session 0 is the phantom as before: same images as a spec without the field set
    np.testing.assert_array_equal(scan, phantom.render_slice(phantom.sample_cohort(replace(spec, session=0))[0])[0])
    with pytest.raises(ValueError, match="session must be >= 0"):
        phantom.CohortSpec(session=-1)


def test_bids_mode_writes_a_bids_dataset(tmp_path):
    from scripts import bids

    spec = phantom.CohortSpec(n=3, seed=4, n_disease=0, unlabelled_fraction=0.5, val_fraction=0.0, test_fraction=0.0)
    phantom.generate(spec, tmp_path, mode="bids", progress=False)
    assert json.loads((tmp_path / "dataset_description.json").read_text())["BIDSVersion"]
    items = bids.bids_items(tmp_path)
    labelled = {s.subject: s for s in phantom.sample_cohort(spec) if s.labelled}
    assert [it["participant_id"] for it in items] == ["sub-0001", "sub-0002", "sub-0003"]
    for item in items:
        assert Path(item["image"]).relative_to(tmp_path).as_posix() == (
            f"{item['participant_id']}/anat/{item['participant_id']}_T1w.nii.gz"
        )
        if item["participant_id"] in labelled:
            assert item["age"] == labelled[item["participant_id"]].age
        else:
            assert "age" not in item  # unlabelled scans carry no age in the BIDS dataset
    assert len(labelled) < 3 and (tmp_path / "derivatives" / "truth" / "sub-0001_brainmask.nii.gz").is_file()


def test_neighbouring_slices_as_channels():
    s = phantom.sample_cohort(phantom.CohortSpec(n=2, seed=1))[0]
    stack = phantom.render_slice(s, channels=3, acquire=False)
    assert stack.shape == (3, 128, 128)
    centre = phantom.render_slice(s, channels=1, acquire=False)[0]
    np.testing.assert_allclose(stack[1], centre, atol=0.02)
    assert not np.allclose(stack[0], stack[2], atol=0.05)


def test_raw_volumes_open_in_nibabel_and_itk(volume_dataset):
    datalist = json.loads((volume_dataset / "datalist.json").read_text())
    items = [it for split in datalist.values() for it in split]
    assert len(items) == 5
    orientations, spacings = set(), set()
    for it in items:
        img = nib.load(volume_dataset / it["image"])
        assert img.get_data_dtype() == np.int16
        assert img.dataobj.slope != 1.0 or img.dataobj.inter == 0.0
        assert img.ndim in (3, 4) and img.shape[3:] in ((), (1,))
        codes = "".join(nib.aff2axcodes(img.affine))
        assert codes == it["orientation"]
        orientations.add(codes)
        zooms = tuple(round(float(z), 2) for z in img.header.get_zooms()[:3])
        spacings.add(zooms)
        data = np.squeeze(img.get_fdata(dtype=np.float32))
        assert data.max() > 100  # scanner units after scl_slope
        itk_img = itk.imread(str(volume_dataset / it["image"]))
        np.testing.assert_allclose(sorted(itk.spacing(itk_img))[:3], sorted(img.header.get_zooms()[:3]), rtol=1e-3)
        truth = nib.load(volume_dataset / it["truth_slice"]).get_fdata()
        assert truth.shape == (128, 128)
    assert len(orientations) >= 3, orientations
    assert len(spacings) == len(items)
    assert any(max(z) > 3.5 for z in spacings), "clinical thick slices expected with grade mixed"


def test_raw_volumes_come_with_their_true_brain_mask(volume_dataset):
    """truth/<subject>_brainmask.nii.gz: the brain in the raw scan's own voxels, where the image shows it."""
    from scipy import ndimage

    datalist = json.loads((volume_dataset / "datalist.json").read_text())
    for it in (it for split in datalist.values() for it in split):
        assert it["truth_brain_mask"] == f"truth/{it['subject']}_brainmask.nii.gz"
        image, mask = nib.load(volume_dataset / it["image"]), nib.load(volume_dataset / it["truth_brain_mask"])
        assert mask.get_data_dtype() == np.uint8 and mask.shape == image.shape[:3]
        np.testing.assert_allclose(mask.affine, image.affine)
        brain = np.asarray(mask.dataobj) > 0
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) == {0, 1}
        litres = brain.sum() * np.prod(image.header.get_zooms()[:3]) / 1e6
        assert 1.2 < litres < 2.8, litres  # the template's brain at the phantom's head sizes
        # aligned with the image: brain tissue inside, the dark CSF and skull just outside
        data = np.squeeze(image.get_fdata(dtype=np.float32))
        core = ndimage.binary_erosion(brain, iterations=3)
        shell = ndimage.binary_dilation(brain, iterations=3) & ~brain
        assert data[core].mean() > 1.5 * data[shell].mean(), it["subject"]


def test_the_emulated_hdbet_mask_bridges_narrow_notches_as_hdbet_does(monkeypatch):
    """The CSF-rim trimming cuts a notch where CSF reaches the surface (a fissure, an open sulcus); HD-BET's mask
    bridges it, keeps all the trimmed mask holds, and adds nothing outside the template's brain (not even in a bay
    the closing would fill)."""
    x, y = np.meshgrid(*(np.arange(130) * s for s in np.diag(mni.grid_affine())[:2]), indexing="ij")
    centre = np.array([x.mean(), y.mean()])
    radius = np.hypot(x - centre[0], y - centre[1])
    brain = (radius < 80.0).astype(np.float64)
    csf = np.zeros_like(brain)
    fissure = (np.abs(y - centre[1]) < 2.0) & (x < centre[0])  # 4 mm wide, from the left edge to the centre
    csf[fissure] = 1.0
    bay = (radius > 55.0) & (np.abs(y - centre[1] - 60.0) < 10.0) & (x > centre[0])  # 20 mm wide, not brain
    brain[bay] = 0.0
    mask = phantom._hdbet_mask(brain, csf)
    monkeypatch.setattr(phantom, "HDBET_CLOSING_MM", 0.0)
    trimmed = phantom._hdbet_mask(brain, csf)
    mouth = fissure & (brain > 0.5) & ~trimmed  # what the trimming cut: the fissure's outer 2 mm
    assert mouth.sum() >= 2 and (radius[mouth] > 77.0).all()
    assert mask[mouth].all() and (mask >= trimmed).all()
    assert not mask[bay].any() and not mask[radius > 80.0].any()  # never beyond the template's brain


def test_the_fast_path_reads_the_raw_volumes_own_voxels():
    """The scanner voxels the fast path computes are the raw volume's, noise included (one acquisition, two
    renderings): a ghost-free clinical scan (thick slices, strong noise) agrees voxel for voxel, up to the volume's
    arbitrary scanner units."""
    people = phantom.sample_cohort(phantom.CohortSpec(n=8, seed=5, n_disease=0, grade="clinical"))
    clinical = next(s for s in people if phantom.draw_acquisition(s).ghost is None)
    atlas = phantom.build_atlas()
    acquisition, anatomy = phantom.draw_acquisition(clinical), phantom.Anatomy.draw(clinical, atlas)
    assert acquisition.thickness > 2.0
    raw = phantom.render_volume(clinical, anatomy)
    ras = nib.orientations.apply_orientation(raw.data, nib.orientations.io_orientation(raw.affine))
    assert ras.shape == tuple(acquisition.dims)
    rng = np.random.default_rng(0)
    centre = acquisition.dims // 2
    voxels = np.concatenate([rng.integers(centre - 25, centre + 25, (400, 3)), rng.integers(0, 20, (100, 3))])
    scanner = phantom._ScannerVoxels(acquisition, anatomy, atlas, phantom.GRADES["clinical"])(voxels)
    ratio = ras[tuple(voxels.T)] / scanner
    assert scanner.min() > 0 and np.ptp(ratio) < 1e-4 * ratio.mean(), np.ptp(ratio) / ratio.mean()


def test_the_fast_path_reproduces_what_the_real_chain_makes_of_the_same_scans(bundle_root, tmp_path):
    """Raw volumes of six people (both grades) through the real chain (ANTs, N4, HD-BET 1.x, slice, scaling) and the
    same people through the fast path agree within the fidelity targets, person by person (docs/phantom.md)."""
    from scripts.preprocess import load_chain, preprocess_items
    from scripts.quality import slice_agreement

    spec = phantom.CohortSpec(n=6, seed=3, n_disease=0, grade="mixed", val_fraction=0.0, test_fraction=0.0)
    phantom.generate(spec, tmp_path / "raw", mode="volumes", workers=2, progress=False)
    items = [
        {**item, "image": str(tmp_path / "raw" / item["image"])}
        for item in json.loads((tmp_path / "raw" / "datalist.json").read_text())["training"]
    ]
    records = preprocess_items(items, tmp_path, load_chain(bundle_root), num_workers=2, progress=False)
    people = {s.subject: s for s in phantom.sample_cohort(spec)}
    agreement: dict[str, list] = {"research": [], "clinical": []}
    for item, record in zip(items, records):
        assert record["status"] == "ok" and record["skull_strip"].startswith("hdbet"), record
        chain = np.asarray(nib.load(tmp_path / record["slice"]).dataobj, dtype=np.float32)
        person = people[item["subject"]]
        agreement[person.grade].append(slice_agreement(chain, phantom.render_slice(person)[0]))
    assert min(map(len, agreement.values())) >= 2  # both grades, a few people each
    for grade, (mean_r, min_r) in {"research": (0.97, 0.93), "clinical": (0.95, 0.90)}.items():
        rows = agreement[grade]
        assert np.mean([a["pixel_r"] for a in rows]) >= mean_r and min(a["pixel_r"] for a in rows) >= min_r, rows
        for a in rows:  # in distribution too: intensities, sharpness, noise and the brain mask
            assert a["histogram_distance"] < 0.03 and a["mask_dice"] > 0.96, a
            assert 0.85 < a["sharpness_ratio"] < 1.15 and 0.8 < a["noise_ratio"] < 1.25, a


def test_accuracy_floor():
    floor = phantom.accuracy_floor(18, 90, 5)
    # Far from the range ends the optimum is sigma * sqrt(2/pi); the bounded prior helps a little.
    assert 3.5 < floor["mae"] < 5 * math.sqrt(2 / math.pi)
    assert phantom.accuracy_floor(18, 90, 0)["mae"] == 0.0
    assert phantom.accuracy_floor(18, 90, 10)["mae"] > floor["mae"]
    # Monte Carlo: the posterior-median predictor reaches the computed floor.
    rng = np.random.default_rng(0)
    a = rng.uniform(18, 90, 20000)
    b = a + rng.normal(0, 5, a.size)
    grid = np.linspace(18, 90, 721)
    post = np.exp(-0.5 * ((b[:, None] - grid[None]) / 5) ** 2)
    median = grid[np.argmax(np.cumsum(post, 1) / post.sum(1, keepdims=True) >= 0.5, axis=1)]
    assert np.abs(median - a).mean() == pytest.approx(floor["mae"], abs=0.08)


def test_disease_cohort_has_known_survival_association(slice_dataset):
    rows = [r for r in read_participants(slice_dataset) if r["cohort"] == "disease"]
    delta = np.array([float(r["delta"]) for r in rows])
    assert delta.mean() > 3  # accelerated ageing
    spec = phantom.CohortSpec()
    assert phantom.true_survival_association(spec) < -0.4
    big = phantom.sample_cohort(phantom.CohortSpec(n=5, n_disease=2000, seed=1))
    sick = [s for s in big if s.cohort == "disease"]
    r = np.corrcoef([s.delta for s in sick], [s.survival_months for s in sick])[0, 1]
    assert r == pytest.approx(phantom.true_survival_association(spec), abs=0.05)


def test_ensure_dataset_generates_once(tmp_path):
    spec = phantom.CohortSpec(n=6, n_disease=0, seed=1)
    path = phantom.ensure_dataset(tmp_path / "phantom", spec)
    stamp = (tmp_path / "phantom" / "phantom.json").stat().st_mtime_ns
    assert phantom.ensure_dataset(tmp_path / "phantom", spec) == path
    assert (tmp_path / "phantom" / "phantom.json").stat().st_mtime_ns == stamp
    # other settings (or a newer phantom version): the generated folder is replaced, not mixed
    phantom.ensure_dataset(tmp_path / "phantom", replace(spec, seed=2))
    assert json.loads((tmp_path / "phantom" / "phantom.json").read_text())["spec"]["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "scan.nii.gz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not a phantom dataset"):
        phantom.ensure_dataset(tmp_path / "mine", spec)


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--n", "0"], "--n: must be a positive integer"),
        (["--age_min", "90", "--age_max", "18"], "age range is empty or reversed"),
        (["--grade", "hospital"], "--grade: invalid choice"),
        (["--mode", "surfaces"], "--mode: invalid choice"),
    ],
)
def test_cli_rejects_bad_input(tmp_path, bundle_root, args, reason):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.phantom", "--out", str(tmp_path / "x"), *args],
        cwd=bundle_root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_cli_help_documents_every_option(bundle_root):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.phantom", "--help"], cwd=bundle_root, capture_output=True, text=True, check=True
    )
    for option in phantom.build_parser()._option_string_actions:
        if option.startswith("--"):
            assert option in proc.stdout
    assert all(action.help for action in phantom.build_parser()._actions)
