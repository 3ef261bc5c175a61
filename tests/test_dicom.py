"""DICOM in: series written by SimpleITK from phantom volumes, read through MONAI's ITKReader."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts import dicom, preprocess
from scripts.transforms import LoadScand

ROOT = Path(__file__).resolve().parents[1]
PATIENT = {"0010|0010": "Doe^Jane", "0010|0030": "19630101", "0010|1010": "063Y", "0010|0020": "PID12345"}


def assert_same_scan(dicom_image, nifti_image) -> None:
    """The same voxels at the same world positions, compared in the closest canonical (RAS) voxel order: DICOM
    slices are right-handed, so a left-handed NIfTI comes back with its third axis (and its affine) reversed."""
    same_place = [
        nib.as_closest_canonical(nib.Nifti1Image(image.numpy()[0], image.affine.numpy()))
        for image in (dicom_image, nifti_image)
    ]
    np.testing.assert_allclose(same_place[0].affine, same_place[1].affine, atol=1e-3)
    r = np.corrcoef(np.asarray(same_place[0].dataobj).ravel(), np.asarray(same_place[1].dataobj).ravel())[0, 1]
    assert r > 0.999  # int16 quantisation only


@pytest.fixture(scope="module")
def volumes(volume_dataset) -> list[Path]:
    items = [it for its in json.loads((volume_dataset / "datalist.json").read_text()).values() for it in its]
    return [volume_dataset / it["image"] for it in items]


@pytest.fixture(scope="module")
def study(volumes, tmp_path_factory) -> Path:
    """A PACS-like export: one patient folder with a T1w 3D series and a T2 FLAIR series of another volume."""
    folder = tmp_path_factory.mktemp("dicom") / "patient-7"
    dicom.write_series(volumes[0], folder, "T1 MPRAGE SAG", patient=PATIENT)
    dicom.write_series(volumes[1], folder, "T2 FLAIR AX", acquisition_type="2D", patient=PATIENT)
    return folder


def test_the_t1_series_is_chosen_and_read_with_the_nifti_geometry(study, volumes):
    series = dicom.list_series(study)
    assert sorted(s.description for s in series) == ["T1 MPRAGE SAG", "T2 FLAIR AX"]
    chosen = dicom.choose_series(study)
    assert chosen.description == "T1 MPRAGE SAG" and chosen.acquisition_type == "3D"
    loaded = LoadScand("image")({"image": str(study)})
    nifti = LoadScand("image")({"image": str(volumes[0])})
    assert loaded["dicom_series"] == "T1 MPRAGE SAG" and "dicom_series" not in nifti
    assert loaded["image"].shape == nifti["image"].shape
    assert_same_scan(loaded["image"], nifti["image"])
    assert not [k for k in loaded["image"].meta if str(k).startswith("0010|")]  # no patient tags carried
    # MONAI's reader gives no DICOM tags by default (series_meta=False); should it ever, they are dropped
    meta = {"0010|0010": "Doe^Jane", "0010|1010": "063Y", "0008|103e": "T1 MPRAGE SAG", "spacing": 1.0}
    assert dicom.strip_patient_tags(meta) == {"0008|103e": "T1 MPRAGE SAG", "spacing": 1.0}


def test_ambiguous_and_empty_folders_are_refused_with_the_series_listed(volumes, tmp_path):
    two = tmp_path / "two"
    dicom.write_series(volumes[0], two, "T1 MPRAGE")
    dicom.write_series(volumes[1], two, "t1_spgr_3d")
    with pytest.raises(dicom.DicomError, match="2 DICOM series and 2 look T1-weighted 3D, so none was chosen") as err:
        dicom.choose_series(two)
    assert "'T1 MPRAGE' (MR, 3D" in str(err.value) and "'t1_spgr_3d' (MR, 3D" in str(err.value)
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.txt").write_text("no images here")
    with pytest.raises(dicom.DicomError, match="no DICOM image series"):
        dicom.choose_series(empty)
    assert dicom.dicom_folders(tmp_path) == [two]
    # in a batch, each is a failure row with its reason and the batch goes on
    chain = preprocess.load_chain(ROOT, skull_strip="template")
    for folder, reason in ((empty, "no DICOM image series"), (two, "none was chosen")):
        record = preprocess.preprocess_scan({"image": str(folder), "subject": folder.name}, tmp_path / "out", chain)
        assert record["status"] == "failed" and record["reason"].startswith(f"load: {folder}: ")
        assert reason in record["reason"] and "\n" not in record["reason"]
    # the command line shows the same
    listing = subprocess.run(
        [sys.executable, "-m", "scripts.dicom", "list", str(two)], cwd=ROOT, capture_output=True, text=True
    )
    assert listing.returncode == 0 and "refused" in listing.stdout and "'t1_spgr_3d' (MR, 3D" in listing.stdout


@pytest.fixture(scope="module")
def small(volumes, tmp_path_factory) -> Path:
    """A phantom volume shrunk 4x (about 50 slices): quick to write and list as a DICOM series."""
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    path = tmp_path_factory.mktemp("small") / "small_T1w.nii.gz"
    image = sitk.Shrink(sitk.ReadImage(str(volumes[0]), sitk.sitkFloat32), [4, 4, 4])
    sitk.WriteImage(image, str(path))
    sitk.WriteImage(image[:, :, :10], str(path.with_name("thin_T1w.nii.gz")))  # 10 slices
    return path


def depth(nifti: Path) -> int:
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(nifti))
    reader.ReadImageInformation()
    return reader.GetSize()[2]


LONE_REFUSED = {  # a folder's only series, and why it is refused
    "flair": (dict(description="FLAIR 3D SAG"), "not T1-weighted ('FLAIR' in its description)"),
    "t2": (dict(description="t2_spc_sag_p2_iso"), "not T1-weighted ('t2' in its description)"),
    "post-contrast": (dict(description="T1 MPRAGE +C"), "post-contrast ('+C' in its description)"),
    "gadolinium": (dict(description="t1_mprage_sag_gd"), "post-contrast ('gd' in its description)"),
    "contrast-agent": (
        dict(description="T1 MPRAGE", patient={"0018|0010": "Gadovist"}),
        "post-contrast (ContrastBolusAgent 'Gadovist')",
    ),
    "2d": (dict(description="T1 SE AX", acquisition_type="2D"), "2D (MRAcquisitionType 2D)"),
    "few-slices": (dict(description="T1 MPRAGE", thin=True), "10 slices, fewer than 16"),
    "not-mr": (dict(description="T1 MPRAGE", patient={"0008|0060": "CT"}), "modality CT, not MR"),
}


@pytest.mark.parametrize("case", LONE_REFUSED)
def test_a_lone_series_that_is_not_t1w_3d_is_refused_with_the_reason(case, small, tmp_path):
    settings, reason = LONE_REFUSED[case]
    settings = dict(settings)
    source = small.with_name("thin_T1w.nii.gz") if settings.pop("thin", False) else small
    folder = dicom.write_series(source, tmp_path / case, **settings)
    (only,) = dicom.list_series(folder)
    with pytest.raises(dicom.DicomError) as err:
        dicom.choose_series(folder)
    modality = settings.get("patient", {}).get("0008|0060", "MR")
    summary = (
        f"'{settings['description']}' ({modality}, {settings.get('acquisition_type', '3D')}, {depth(source)} slices)"
    )
    assert only.summary() == summary and not only.looks_t1_3d()
    assert str(err.value) == f"{folder}: its only DICOM series, {summary}, is not a T1-weighted 3D volume: {reason}"


def test_a_lone_t1w_series_is_taken_and_a_post_contrast_t1_is_not_chosen(small, tmp_path):
    for description in ("T1 MPRAGE SAG", "T1 MPRAGE PRE-CONTRAST", ""):  # no description: exports often strip it
        folder = dicom.write_series(small, tmp_path / f"lone{len(description)}", description)
        (only,) = dicom.list_series(folder)
        chosen = dicom.choose_series(folder)
        assert chosen.identifier == only.identifier and chosen.description == description
        assert chosen.slices == len(chosen.files) == depth(small) >= dicom.MIN_SLICES
    # a study with the T1 before and after contrast: the pre-contrast one is chosen
    both = tmp_path / "pre-and-post"
    dicom.write_series(small, both, "T1 MPRAGE SAG")
    dicom.write_series(small, both, "T1 MPRAGE SAG POST")
    series = {s.description: s for s in dicom.list_series(both)}
    assert dicom.choose_series(both).identifier == series["T1 MPRAGE SAG"].identifier
    assert series["T1 MPRAGE SAG"].looks_t1_3d() and not series["T1 MPRAGE SAG POST"].looks_t1_3d()


def test_an_enhanced_multiframe_series_counts_its_frames_and_is_read(volumes, small, tmp_path, capsys):
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    # a left-handed volume (NIfTI allows it, DICOM does not): write_series makes it right-handed first
    volume = next(v for v in volumes if np.linalg.det(nib.load(v).affine[:3, :3]) < 0)
    enhanced = dicom.write_series(volume, tmp_path / "enhanced", "T1 MPRAGE SAG", multiframe=True)
    (only,) = dicom.list_series(enhanced)
    n = depth(volume)
    assert len(only.files) == 1 and only.slices == n > dicom.MIN_SLICES
    reader = sitk.ImageFileReader()
    reader.SetFileName(only.files[0])
    reader.ReadImageInformation()  # a genuine enhanced MR file, as GDCM writes one
    sop_class, frames = (reader.GetMetaData(tag).strip() for tag in ("0008|0016", "0028|0008"))
    assert sop_class == "1.2.840.10008.5.1.4.1.1.4.1" and frames == str(n)  # Enhanced MR Image Storage
    assert only.summary() == f"'T1 MPRAGE SAG' (MR, 3D, {n} slices in 1 file)"
    assert dicom.choose_series(enhanced).identifier == only.identifier
    # the chain's load stage (MONAI's ITKReader, then the single-volume check) gives the NIfTI's volume
    chain = preprocess.load_chain(ROOT, skull_strip="template")
    load = [t for t in preprocess.chain_transforms(chain) if getattr(t, "stage", "") == "load"]
    assert [type(t).__name__ for t in load] == ["LoadScand", "EnsureSingleVolumed"]
    loaded, nifti = {"image": str(enhanced)}, {"image": str(volume)}
    for t in load:
        loaded, nifti = t(loaded), t(nifti)
    assert loaded["dicom_series"] == "T1 MPRAGE SAG" and loaded["image"].shape == nifti["image"].shape
    assert_same_scan(loaded["image"], nifti["image"])
    # beside a 2D FLAIR, the one-file series is the T1-weighted 3D one (counting files, none was)
    mixed = tmp_path / "mixed"
    shutil.copytree(enhanced, mixed)
    dicom.write_series(small, mixed, "T2 FLAIR AX", acquisition_type="2D")
    assert dicom.choose_series(mixed).identifier == only.identifier
    # 10 frames in one file: too few slices, and the command line says why
    thin = dicom.write_series(small.with_name("thin_T1w.nii.gz"), tmp_path / "thin", multiframe=True)
    with pytest.raises(dicom.DicomError, match=r"\(MR, 3D, 10 slices in 1 file\), is not a T1-weighted 3D volume"):
        dicom.choose_series(thin)
    assert dicom.main(["list", str(thin)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{thin}: refused: {thin}: its only DICOM series, 'T1 MPRAGE' (MR, 3D, 10 slices in 1 file), is not a "
        f"T1-weighted 3D volume: 10 slices, fewer than {dicom.MIN_SLICES}",
        "    'T1 MPRAGE' (MR, 3D, 10 slices in 1 file)",
    ]


def test_patient_age_from_age_tag_or_dates(study, volumes, tmp_path):
    assert dicom.patient_age(dicom.choose_series(study)) == 63.0
    months = tmp_path / "months"
    dicom.write_series(volumes[0], months, patient={"0010|1010": "018M"})
    assert dicom.patient_age(dicom.choose_series(months)) == 1.5
    dated = tmp_path / "dated"  # no PatientAge: birth date to study date (2026-01-01)
    dicom.write_series(volumes[0], dated, patient={"0010|0030": "19660101"})
    assert dicom.patient_age(dicom.choose_series(dated)) == pytest.approx(60.0, abs=0.01)
    nothing = tmp_path / "nothing"
    dicom.write_series(volumes[0], nothing)
    assert dicom.patient_age(dicom.choose_series(nothing)) is None


def test_inference_on_dicom_folders_matches_nifti_and_writes_no_patient_data(
    run_workflow, trained_model, study, volumes, tmp_path
):
    scans = tmp_path / "scans"
    shutil.copytree(study, scans / "hospital" / "patient-7")
    shutil.copy(volumes[0], scans / "same_volume_T1w.nii.gz")
    (scans / "empty-export").mkdir()  # no DICOM in it: not a scan
    out = tmp_path / "out"
    settings = dict(
        ckpt_path=str(trained_model["ckpt_path"]), num_workers=1, skull_strip="template", output_dir=str(out)
    )
    run_workflow("inference.yaml", "inference", input=str(scans), **settings)
    with open(out / "predictions.csv", newline="") as fh:
        rows = {r["subject"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"hospital/patient-7", "same_volume_T1w"}
    dicom_row, nifti_row = rows["hospital/patient-7"], rows["same_volume_T1w"]
    assert dicom_row["error"] == "" and dicom_row["age"] == "" and dicom_row["brain_pad"] == ""
    # the same head through DICOM and NIfTI: the same brain age
    assert float(dicom_row["predicted_age"]) == pytest.approx(float(nifti_row["predicted_age"]), abs=0.5)
    # no patient name, ID, birth date or age in anything written
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".csv", ".json", ".tsv", ".txt"):
            text = path.read_text()
            for value in ("Doe^Jane", "PID12345", "19630101", "063Y"):
                assert value not in text, f"{value} written to {path}"

    # asked for: the header's age fills the age column and the brain-PAD (the preprocessing is cached)
    run_workflow("inference.yaml", "inference", input=str(scans), dicom_age=True, **settings)
    with open(out / "predictions.csv", newline="") as fh:
        again = {r["subject"]: r for r in csv.DictReader(fh)}
    row = again["hospital/patient-7"]
    assert float(row["age"]) == 63.0 and again["same_volume_T1w"]["age"] == ""
    assert float(row["brain_pad"]) == pytest.approx(float(row["predicted_age"]) - 63.0, abs=1e-3)
    assert float(row["predicted_age"]) == pytest.approx(float(dicom_row["predicted_age"]), abs=1e-3)
