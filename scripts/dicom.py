"""DICOM in: a folder holding a DICOM series is a scan.

The series are listed the way MONAI's ``ITKReader`` lists them (ITK's GDCM series names, with series
details and the series date as restriction), so the identifier chosen here is the ``series_name`` that
reader then loads. With several series in one folder, the T1-weighted 3D one is taken when exactly one
series looks like it (:func:`choose_series`); otherwise the scan is refused with the list of series. A folder's
only series is checked too: it is refused when it is clearly not a T1-weighted 3D volume (T2, FLAIR, DWI, ...,
post-contrast, 2D, too few slices, not MR). Slices are counted over frames, so that an enhanced (multi-frame)
series, the whole volume in one file, counts its NumberOfFrames.

Privacy: patient tags (group 0010: name, ID, birth date, age, sex, ...) are never copied into the
bundle's outputs. Only :func:`patient_age`, called when a user asks for the age from the DICOM header
(``--dicom_age true``), reads the age.

    python -m scripts.dicom list FOLDER                                # the series of a folder, and the one used
    python -m scripts.dicom from-nifti SCAN.nii.gz OUT [--multiframe]  # a NIfTI volume as a DICOM MR series
"""

from __future__ import annotations

import contextlib
import hashlib
import locale
import re
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np

from scripts import cli

# Series descriptions (or sequence names) of T1-weighted 3D acquisitions, and of what is not one.
T1_PATTERN = re.compile(r"t1|mprage|mp-rage|mp2rage|spgr|bravo|tfe|tfl|fspgr|ir-?fspgr", re.IGNORECASE)
NOT_T1_PATTERN = re.compile(r"t2|flair|dwi|dti|diff|swi|pd|bold|fmri|perf|asl|localizer|scout|survey", re.IGNORECASE)
# Post-contrast: "+C", "C+", "POST" (not "post-op"), "GD", "GAD...", "CE" (words; a digit may lead: "T1CE", "T1GD"),
# "contrast" (a "pre-", "non-", "no " or "without" contrast is first taken out of the text)
POST_CONTRAST_PATTERN = re.compile(
    r"\+\s*c(?![a-z])|(?<![a-z])(?:c\s*\+|post(?![\s_-]*op)|gd|gad\w*|ce|contrast)(?![a-z])", re.IGNORECASE
)
PRE_CONTRAST_PATTERN = re.compile(
    r"(?<![a-z])(?:pre|non|no|without|w/o)[\s_-]*(?:contrast|gd|gad\w*|c)(?![a-z])", re.IGNORECASE
)
NO_AGENT = re.compile(r"(?:none|no|n/a|na|-|0)?", re.IGNORECASE)  # ContrastBolusAgent values that mean no contrast
MIN_SLICES = 16  # fewer is a localizer or a single 2D slab, not a volume to register
TAGS = {
    "description": "0008|103e",
    "modality": "0008|0060",
    "acquisition_type": "0018|0023",
    "sequence": "0018|0024",
    "contrast_agent": "0018|0010",
    "frames": "0028|0008",  # NumberOfFrames: an enhanced (multi-frame) file holds that many slices
    "patient_age": "0010|1010",
    "birth_date": "0010|0030",
    "study_date": "0008|0020",
}


class DicomError(ValueError):
    """A DICOM folder that cannot be used, in one line naming the folder and the reason."""


@dataclass
class Series:
    """One DICOM series of a folder: MONAI/ITK's series identifier, its files and the tags that pick it."""

    identifier: str
    files: list[str]
    description: str = ""
    modality: str = ""
    acquisition_type: str = ""
    sequence: str = ""
    contrast_agent: str = ""
    slices: int = 0  # the sum over its files of NumberOfFrames (1 for a file without it)

    def problems(self) -> list[str]:
        """Why this series is clearly not a T1-weighted 3D volume (empty when nothing says so)."""
        out = []
        if self.modality not in ("MR", ""):
            out.append(f"modality {self.modality}, not MR")
        named = (("description", self.description), ("sequence name", self.sequence))
        not_t1 = [f"'{m.group(0)}' in its {where}" for where, text in named if (m := NOT_T1_PATTERN.search(text))]
        if not_t1:
            out.append(f"not T1-weighted ({not_t1[0]})")
        contrast = [
            f"'{m.group(0).strip()}' in its {where}"
            for where, text in named
            if (m := POST_CONTRAST_PATTERN.search(PRE_CONTRAST_PATTERN.sub(" ", text)))
        ]
        if not NO_AGENT.fullmatch(self.contrast_agent):
            contrast.append(f"ContrastBolusAgent '{self.contrast_agent}'")
        if contrast:
            out.append(f"post-contrast ({contrast[0]})")
        if self.acquisition_type == "2D":
            out.append("2D (MRAcquisitionType 2D)")
        if self.slices < MIN_SLICES:
            out.append(f"{self.slices} slices, fewer than {MIN_SLICES}")
        return out

    def looks_t1_3d(self) -> bool:
        return not self.problems() and bool(T1_PATTERN.search(f"{self.description} {self.sequence}"))

    def summary(self) -> str:
        files = "" if self.slices == len(self.files) else f" in {len(self.files)} file{'s' * (len(self.files) > 1)}"
        return (
            f"'{self.description or '(no description)'}' ({self.modality or '?'}, "
            f"{self.acquisition_type or '?'}, {self.slices} slices{files})"
        )


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def holds_dicom(folder: str | Path) -> bool:
    """Whether ``folder`` has a DICOM file directly in it."""
    folder = Path(folder)
    return folder.is_dir() and any(is_dicom_file(p) for p in folder.iterdir() if p.is_file())


def dicom_folders(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that directly holds DICOM files, sorted."""
    root = Path(root)
    candidates = [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    return [p for p in candidates if holds_dicom(p)]


def _tags(path: str) -> dict[str, str]:
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    return {name: reader.GetMetaData(tag).strip() if tag in keys else "" for name, tag in TAGS.items()}


def _frames(value: str) -> int:
    """A file's slice count from its NumberOfFrames: 1 when absent (or unreadable)."""
    try:
        return max(int(value), 1)
    except ValueError:
        return 1


def list_series(folder: str | Path) -> list[Series]:
    """The DICOM series in ``folder``, with the identifiers MONAI's ``ITKReader`` uses."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date, as monai.data.ITKReader
    names.SetDirectory(str(folder))
    out = []
    for identifier in names.GetSeriesUIDs():
        files = list(names.GetFileNames(identifier))
        tags = [_tags(f) for f in files]  # every file: the slices are the sum of their NumberOfFrames
        out.append(
            Series(
                identifier=str(identifier),
                files=files,
                description=tags[0]["description"],
                modality=tags[0]["modality"],
                acquisition_type=tags[0]["acquisition_type"],
                sequence=tags[0]["sequence"],
                contrast_agent=tags[0]["contrast_agent"],
                slices=sum(_frames(t["frames"]) for t in tags),
            )
        )
    return out


def choose_series(folder: str | Path) -> Series:
    """The series to read from ``folder``: the only T1-weighted 3D one; else :class:`DicomError`.

    A folder's only series is taken unless something says it is not a T1-weighted 3D volume
    (:meth:`Series.problems`): one without a description, or with one that names no sequence the patterns know,
    is taken, since exports often strip or rewrite descriptions. Among several series, only one whose description
    or sequence name says T1-weighted (and that has no problem) counts.
    """
    series = list_series(folder)
    if not series:
        raise DicomError(f"{folder}: no DICOM image series in this folder")
    if len(series) == 1:
        if problems := series[0].problems():
            why = "; ".join(problems)
            raise DicomError(
                f"{folder}: its only DICOM series, {series[0].summary()}, is not a T1-weighted 3D volume: {why}"
            )
        return series[0]
    t1 = [s for s in series if s.looks_t1_3d()]
    if len(t1) == 1:
        return t1[0]
    listed = "; ".join(s.summary() for s in series)
    why = "none looks T1-weighted 3D" if not t1 else f"{len(t1)} look T1-weighted 3D"
    raise DicomError(f"{folder}: {len(series)} DICOM series and {why}, so none was chosen: {listed}")


def patient_age(series: Series) -> float | None:
    """Age in years from PatientAge (``065Y``, ``018M``, ...) or birth and study dates; None when absent.

    Only called when the user asks for the DICOM age (``dicom_age``): the bundle never reads patient
    tags otherwise.
    """
    tags = _tags(series.files[0])
    match = re.fullmatch(r"(\d{1,3})([DWMY])", tags["patient_age"])
    if match:
        return int(match.group(1)) / {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
    try:
        born = date(int(tags["birth_date"][:4]), int(tags["birth_date"][4:6]), int(tags["birth_date"][6:8]))
        seen = date(int(tags["study_date"][:4]), int(tags["study_date"][4:6]), int(tags["study_date"][6:8]))
    except ValueError:
        return None
    return (seen - born).days / 365.25


def strip_patient_tags(meta: dict) -> dict:
    """``meta`` without DICOM group 0010 (patient) entries."""
    return {k: v for k, v in meta.items() if not str(k).startswith("0010|")}


def write_series(
    volume_path: str | Path,
    out_dir: str | Path,
    description: str = "T1 MPRAGE",
    acquisition_type: str = "3D",
    series_uid: str | None = None,
    patient: dict[str, str] | None = None,
    multiframe: bool = False,
) -> Path:
    """Write a NIfTI volume as a DICOM MR series (int16, one file per slice), keeping its geometry.

    For trying the DICOM path and for the tests: ``patient`` adds tags such as ``{"0010|1010": "063Y"}`` (or any
    other, e.g. ``{"0018|0010": "Gadovist"}``). With ``multiframe``, the volume is one enhanced MR file (GDCM writes
    Enhanced MR Image Storage with NumberOfFrames and per-frame positions) instead of one file per slice.
    """
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    image = _right_handed(sitk.ReadImage(str(volume_path), sitk.sitkFloat32))
    array = sitk.GetArrayFromImage(image)
    scale = 4000.0 / max(float(np.percentile(array, 99.9)), 1e-6)
    image16 = sitk.Cast(sitk.Clamp(image * scale, sitk.sitkFloat32, 0, 32767), sitk.sitkInt16)
    digest = hashlib.sha256(f"{Path(volume_path).name}|{description}".encode()).hexdigest()
    uid = series_uid or f"1.2.826.0.1.3680043.8.498.{int(digest[:15], 16)}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _locale_kept():  # GDCM's writer sets the process's LC_CTYPE to "C" (Python then decodes text as ASCII)
        _write_planes(image, image16, out, description, acquisition_type, uid, patient, multiframe)
    return out


def _right_handed(image):
    """The same scan with its third axis reversed where its voxel axes are left-handed (NIfTI allows it; DICOM's
    slice axis is the cross product of row and column, so an enhanced file of a left-handed volume would put every
    frame on the wrong side of the first: a whole extent away)."""
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    direction = np.array(image.GetDirection()).reshape(3, 3)
    if np.linalg.det(direction) > 0:
        return image
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[::-1].copy())
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, image.GetDepth() - 1)))
    flipped.SetDirection(tuple((direction * np.array([1.0, 1.0, -1.0])).ravel()))
    return flipped


@contextlib.contextmanager
def _locale_kept():
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_planes(
    image, image16, out: Path, description: str, acquisition_type: str, uid: str, patient, multiframe: bool = False
) -> None:
    import SimpleITK as sitk  # noqa: N813 (the library's own convention)

    direction = image.GetDirection()
    orientation = "\\".join(
        f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    )
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    tags = {
        "0008|0060": "MR",
        "0008|0021": "20260101",
        "0008|0020": "20260101",
        "0008|103e": description,
        "0018|0023": acquisition_type,
        "0020|000e": uid,
        "0020|000d": uid + ".1",
        "0020|0037": orientation,
        "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        **(patient or {}),
    }
    if multiframe:  # GDCM computes orientation, positions and spacing from the image's geometry
        for tag in ("0020|0037", "0018|0050"):
            tags.pop(tag)
        for tag, value in {**tags, "0008|0018": f"{uid}.1", "0020|0013": "1"}.items():
            image16.SetMetaData(tag, value)
        writer.SetFileName(str(out / f"{description.replace(' ', '_')}.dcm"))
        writer.Execute(image16)
        return
    for k in range(image.GetDepth()):
        plane = image16[:, :, k]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        plane.SetMetaData("0020|0013", str(k + 1))
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(out / f"{description.replace(' ', '_')}_{k + 1:04d}.dcm"))
        writer.Execute(plane)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m scripts.dicom", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="list the DICOM series of a folder and the one the bundle would read")
    show.add_argument("folder")
    write = sub.add_parser("from-nifti", help="write a NIfTI volume as a DICOM MR series (int16)")
    write.add_argument("nifti")
    write.add_argument("out")
    write.add_argument("--description", default="T1 MPRAGE", help="SeriesDescription (default: %(default)s)")
    write.add_argument("--multiframe", action="store_true", help="one enhanced multi-frame file, not a file a slice")
    args = parser.parse_args(argv)
    if args.command == "from-nifti":
        print(write_series(args.nifti, args.out, args.description, multiframe=args.multiframe))
        return 0
    folders = dicom_folders(args.folder)
    if not folders:
        parser.error(f"{args.folder}: no DICOM files in this folder or below it")
    for folder in folders:
        series = list_series(folder)
        try:
            chosen = choose_series(folder).identifier
            verdict = "reads the series marked *"
        except DicomError as err:
            chosen, verdict = None, f"refused: {err}"
        print(f"{folder}: {verdict}")
        for s in series:
            print(f"  {'*' if s.identifier == chosen else ' '} {s.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
