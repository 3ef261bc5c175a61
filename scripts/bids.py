"""BIDS in and out: T1w scans of a BIDS dataset as datalist items, subject-level splits, and the
BIDS-derivatives folder that inference writes.

Discovery uses pybids (``BIDSLayout``), the BIDS community's own parser: it knows every entity, skips
``derivatives/``, ``code/``, ``sourcedata/`` and dot files, and agrees with the validator on file names
(pybids 0.22 does not read ``.bidsignore``, the validator's list; only ``sub-*/[ses-*/]anat/*_T1w`` images
are taken anyway). It is indexed without validation and without reading JSON sidecars (one malformed
sidecar would otherwise stop the whole dataset; nothing here needs them): ~2 ms per file, measured on
12,000 files (4,000 T1w, 8 s to index, 2 s to query; docs/real_data.md). The two tables it does not
interpret for us, ``participants.tsv`` and ``sub-*/sub-*_sessions.tsv``, are read here with the csv module.

Every item is one image: ``subject`` is the scan's identity (its file name up to ``_T1w``, e.g.
``sub-01_ses-2_run-1``, unique within a dataset), ``participant_id`` / ``session_id`` / ``run`` / ``acq``
are its entities, and every participants.tsv column rides along (``sessions.tsv`` wins per session where
it has the column). The age of a scan:

* where the participant's ``sessions.tsv`` has an ``age`` column and lists the session, that session age
  only; ``n/a`` there (or a value that is not a number) means the scan has no age, never the
  participant's;
* else, for a participant with one session (or none), the participants.tsv ``age``;
* else no age: participants.tsv describes one visit of a participant with several sessions, so its age
  would be the wrong label for the others (one warning per participant: give the ages in
  ``sub-X/sub-X_sessions.tsv``).

``89+`` (how BIDS de-identifies ages of 89 and over) is a censored age: no age, with its own warning.
A scan without an age is still predicted (empty brain-PAD) and trains the diffusion arm only.
Subject-level splitting keeps all of a participant's scans in one split.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from scripts.atomic import safe_name, write_csv, write_json, write_text
from scripts.cli import BundleError

logger = logging.getLogger(__name__)

ENTITY_COLUMNS = {"session": "session_id", "acquisition": "acq", "run": "run"}
SPLIT_NAMES = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
SPLIT_NAMES.update(test="test", testing="test", calibration="calibration")
MISSING = ("", "n/a", "na", "nan")
CENSORED_AGE = re.compile(r"\d+(\.\d*)?\s*\+")  # "89+": BIDS de-identification of ages 89 and over
# item keys the scan itself defines; a participants.tsv/sessions.tsv column of that name is not copied over them
RESERVED_COLUMNS = ("participant_id", "session_id", "image", "subject", "acq", "run", "source", "qc", "error")
DERIVATIVES_TABLE = "brainage.tsv"
#: Column descriptions of the derivatives table's JSON sidecar (BIDS "tabular file" sidecar format).
COLUMN_DESCRIPTIONS = {
    "participant_id": {"Description": "BIDS participant label (sub-<label>)"},
    "session_id": {"Description": "BIDS session label (ses-<label>); n/a without sessions"},
    "acq": {"Description": "acq entity of the source image"},
    "run": {"Description": "run entity of the source image"},
    "source": {"Description": "the T1w image, relative to the source dataset"},
    "predicted_age": {
        "Description": "brain age predicted from the medial axial slice (the median over slice_levels levels)",
        "Units": "year",
    },
    "predicted_age_lower": {"Description": "lower end of the prediction interval", "Units": "year"},
    "predicted_age_upper": {"Description": "upper end of the prediction interval", "Units": "year"},
    "age": {"Description": "chronological age (participants.tsv or sessions.tsv)", "Units": "year"},
    "brain_pad": {"Description": "brain-predicted age difference: predicted_age - age", "Units": "year"},
    "brain_pad_lower": {"Description": "lower end of the prediction interval minus age", "Units": "year"},
    "brain_pad_upper": {"Description": "upper end of the prediction interval minus age", "Units": "year"},
    "brain_pad_corrected": {
        "Description": "brain-PAD after the age-bias correction fitted on the model's validation data",
        "Units": "year",
    },
    "brain_pad_corrected_lower": {
        "Description": "lower end of the age-conditional interval of brain_pad_corrected",
        "Units": "year",
    },
    "brain_pad_corrected_upper": {
        "Description": "upper end of the age-conditional interval of brain_pad_corrected",
        "Units": "year",
    },
    "slice_levels": {"Description": "axial levels predicted; predicted_age is the median of their ages"},
    "level_sd": {"Description": "sd of the per-level predicted ages (n/a for one level)", "Units": "year"},
    "qc": {"Description": "QC image of the preprocessed slice with its brain-mask outline"},
    "error": {"Description": "why the image could not be used (empty when it was)"},
}


class BidsError(BundleError, ValueError):
    """A BIDS dataset problem that stops the run, in one line naming the folder and the reason."""


def is_bids_root(path: str | Path) -> bool:
    """A folder with ``dataset_description.json`` or ``sub-*`` folders (the two marks of a BIDS root)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / "dataset_description.json").is_file() or any(
        p.is_dir() for p in path.glob("sub-*") if not p.name.startswith(".")
    )


def read_tsv(path: Path, keep: Iterable[str] = ()) -> list[dict]:
    """Rows of a BIDS TSV with ``n/a`` and empty cells left out of each row, except in the ``keep`` columns: a
    column of those that the file has is in every row as written (``""`` for a short row), so that an ``n/a``
    there can be told from a file without the column."""
    keep = set(keep)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    cells = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str) and k.strip()} for row in rows]
    return [{k: v for k, v in row.items() if k in keep or v.lower() not in MISSING} for row in cells]


def _prefixed(label: str, prefix: str) -> str:
    return label if label.startswith(f"{prefix}-") else f"{prefix}-{label}"


def _value(text: str):
    """A TSV cell as a number where it is one (ages, survival months), else the text."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _age(text: str, where: str, warn_missing: bool) -> float | None:
    """An ``age`` cell in years, or None (with a warning naming ``where`` and the value) when it gives none."""
    if text.lower() in MISSING:
        if warn_missing:
            logger.warning(f"{where}: age {text!r}: no age for that session's scans (not the participant's either)")
        return None
    if CENSORED_AGE.fullmatch(text):
        logger.warning(
            f"{where}: age {text!r} is censored (BIDS writes ages of 89 and over as 89+, for de-identification); "
            "not used as an age"
        )
        return None
    age = _value(text)
    if isinstance(age, float) and age >= 0:
        return age
    logger.warning(f"{where}: age {text!r} is not a number of years; not used as an age")
    return None


def _columns(row: dict, where: str, warn_missing: bool = False) -> dict:
    """A participants/sessions row as item columns; an age that is not a usable number is left out, with a warning
    (for a missing age only when ``warn_missing``)."""
    out = {
        k: _value(v) for k, v in row.items() if k not in RESERVED_COLUMNS and k != "age" and v.lower() not in MISSING
    }
    age = _age(row["age"], where, warn_missing) if "age" in row else None
    return out if age is None else {**out, "age": age}


def bids_items(root: str | Path) -> list[dict]:
    """One item per ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` of the BIDS dataset at ``root``.

    Raises :class:`BidsError` when the folder holds no T1w image. A missing participants.tsv, a
    participant it does not list, an age that is not a number or is censored (``89+``), an ``n/a``
    session age, or a participant with several sessions and no session ages is a warning: those scans
    are predicted without an age (empty brain-PAD). Which age a scan takes: the module docstring.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise BidsError(f"{root}: not a folder")
    layout = BIDSLayout(root, validate=False, indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
    files = layout.get(suffix="T1w", extension=[".nii", ".nii.gz"], datatype="anat")
    if not files:
        raise BidsError(f"{root}: no T1w images (expected sub-*/[ses-*/]anat/*_T1w.nii[.gz])")

    participants: dict[str, dict] = {}
    table = root / "participants.tsv"
    if table.is_file():
        for row in read_tsv(table, keep=("age",)):
            if "participant_id" in row:
                pid = _prefixed(row["participant_id"], "sub")
                participants[pid] = _columns(row, f"{table} ({pid})")
    else:
        logger.warning(f"{root}: no participants.tsv; every scan is predicted without an age (empty brain-PAD)")
    sessions: dict[tuple[str, str], dict] = {}
    dated: set[tuple[str, str]] = set()  # sessions listed in a sessions.tsv with an age column: their age is that
    for path in sorted(root.glob("sub-*/sub-*_sessions.tsv")):
        pid = path.parent.name
        for row in read_tsv(path, keep=("age",)):
            if "session_id" in row:
                sid = _prefixed(row["session_id"], "ses")
                sessions[(pid, sid)] = _columns(row, f"{path} ({sid})", warn_missing=True)
                if "age" in row:
                    dated.add((pid, sid))

    scans: list[tuple[dict, str]] = []
    for f in sorted(files, key=lambda f: f.path):
        entities = f.get_entities()
        pid = f"sub-{entities['subject']}"
        item = {"image": f.path, "subject": Path(f.path).name.split("_T1w")[0], "participant_id": pid}
        for entity, column in ENTITY_COLUMNS.items():
            if entity in entities:
                item[column] = f"ses-{entities[entity]}" if entity == "session" else str(entities[entity])
        scans.append((item, pid))
    visits: dict[str, set] = {}
    for item, pid in scans:
        visits.setdefault(pid, set()).add(item.get("session_id"))

    items, unlisted, undated = [], set(), {}
    for item, pid in scans:
        key = (pid, item.get("session_id", ""))
        if table.is_file() and pid not in participants:
            unlisted.add(pid)
        item.update(participants.get(pid, {}))
        if key not in dated and len(visits[pid]) > 1 and "age" in item:
            undated.setdefault(pid, set()).add(key[1])  # participants.tsv's age: which of the sessions?
        if key in dated or len(visits[pid]) > 1:
            item.pop("age", None)
        item.update(sessions.get(key, {}))
        items.append(item)
    if unlisted:
        logger.warning(
            f"{table}: {len(unlisted)} participant(s) not listed ({', '.join(sorted(unlisted)[:5])}"
            f"{', ...' if len(unlisted) > 5 else ''}); their scans are predicted without an age"
        )
    for pid, missing in sorted(undated.items()):
        logger.warning(
            f"{pid}: {len(visits[pid])} sessions and no sessions.tsv age for {', '.join(sorted(missing))}; "
            f"participants.tsv's age describes one visit, so those scans are predicted without an age: add an age "
            f"column to {pid}/{pid}_sessions.tsv (the age at each session)"
        )
    return items


def _labelled(item: dict) -> bool:
    return isinstance(item.get("age"), float) and math.isfinite(item["age"])


def split_items(
    items: list[dict], column: str | None = None, seed: int = 0, fractions: Iterable[float] = (0.6, 0.15, 0.1, 0.15)
) -> dict[str, list[dict]]:
    """``{"training", "validation", "calibration", "test"}`` lists of ``items`` with no participant in two of them.

    ``column``: a participants.tsv column naming each participant's split (``training``/``train``,
    ``validation``/``val``, ``calibration``, ``test``); participants with another or no value are left out, with a
    warning. Without it, participants with an age are shuffled with ``seed`` and cut by ``fractions``: training,
    validation, test, or training, validation, calibration, test (the prediction interval is fitted on the
    calibration split; without one, on validation); at least one participant in each of validation and test when
    there are three or more. Participants without any age go to training, where they train the diffusion arm only.
    """
    by_participant: dict[str, list[dict]] = {}
    for item in items:
        by_participant.setdefault(item.get("participant_id") or item["subject"], []).append(item)
    out: dict[str, list[dict]] = {"training": [], "validation": [], "calibration": [], "test": []}
    if column:
        left_out = []
        for pid, scans in by_participant.items():
            split = SPLIT_NAMES.get(str(scans[0].get(column, "")).strip().lower())
            if split is None:
                left_out.append(pid)
            else:
                out[split] += scans
        if left_out:
            logger.warning(
                f"split column {column!r}: {len(left_out)} participant(s) without training/validation/test there "
                f"({', '.join(sorted(left_out)[:5])}{', ...' if len(left_out) > 5 else ''}); left out"
            )
        return out
    fractions = [float(f) for f in fractions]
    if len(fractions) not in (3, 4) or min(fractions) < 0 or sum(fractions) <= 0:
        raise BidsError(
            f"split fractions {fractions}: need three or four non-negative numbers (training, validation, "
            "[calibration,] test)"
        )
    if len(fractions) == 3:
        fractions.insert(2, 0.0)
    labelled = sorted(pid for pid, scans in by_participant.items() if any(_labelled(s) for s in scans))
    unlabelled = sorted(set(by_participant) - set(labelled))
    random.Random(seed).shuffle(labelled)
    n = len(labelled)
    total = sum(fractions)
    n_val, n_cal, n_test = (round(n * f / total) for f in fractions[1:])
    if n >= 3:
        n_val, n_test = max(n_val, 1 if fractions[1] else 0), max(n_test, 1 if fractions[3] else 0)
    n_train = max(n - n_val - n_cal - n_test, 0)
    cuts = {"training": (0, n_train), "validation": (n_train, n_train + n_val)}
    cuts.update(calibration=(n_train + n_val, n_train + n_val + n_cal), test=(n_train + n_val + n_cal, n))
    for split, (start, stop) in cuts.items():
        for pid in labelled[start:stop] + (unlabelled if split == "training" else []):
            out[split] += by_participant[pid]
    return out


def write_split_datalist(
    root: str | Path, path: str | Path, column: str | None = None, seed: int = 0, fractions=(0.6, 0.15, 0.1, 0.15)
) -> Path:
    """The BIDS dataset at ``root`` as a datalist JSON at ``path`` (what ``preprocess`` and training read)."""
    splits = split_items(bids_items(root), column, seed, fractions)
    if not splits["calibration"]:  # the interval then comes from validation, with a warning at training
        del splits["calibration"]
    for split, items in splits.items():
        if not items:
            logger.warning(f"{root}: the {split} split is empty")
    return write_json(path, {**splits, "bids_root": str(Path(root).expanduser().resolve())})


# -- BIDS derivatives out ----------------------------------------------------------------------
def generated_by(bundle_root: str | Path) -> dict:
    """The ``GeneratedBy`` entry naming this bundle and its version (from configs/metadata.json)."""
    meta = json.loads((Path(bundle_root) / "configs" / "metadata.json").read_text())
    return {
        "Name": meta.get("name", "brain-age diffusion autoencoder bundle"),
        "Version": meta.get("version", "unknown"),
        "Description": "MONAI bundle: brain age from the medial axial slice of a T1w MRI (Ijishakin et al.)",
    }


#: The cohort report (``scripts.report``), in the output folder and in the derivatives.
REPORT_NAME = "report.html"
#: What the derivatives' ``.bidsignore`` lists: outputs the BIDS specification has no file rule for (the BIDS
#: validator would report them as NOT_INCLUDED), as fMRIPrep lists its ``figures/``.
DERIVATIVES_BIDSIGNORE = (
    "# outputs of this bundle that BIDS has no file rules for: the group table and its sidecar, the QC figures,",
    "# the cohort report",
    f"/{DERIVATIVES_TABLE}",
    f"/{DERIVATIVES_TABLE.replace('.tsv', '.json')}",
    "figures/",
    f"/{REPORT_NAME}",
)


def _derivatives_readme(generator: dict, source_root: Path) -> str:
    return (
        f"# {generator['Name']} predictions\n\n"
        f"BIDS-derivatives dataset written by {generator['Name']} {generator['Version']} ({generator['Description']}) "
        f"from the T1w images of the BIDS dataset at {source_root}.\n\n"
        f"- `{DERIVATIVES_TABLE}`: one row per T1w image (its entities, `source` path, predicted brain age, "
        "chronological age, brain-PAD, QC image and error; `n/a` where a value is absent); "
        f"`{DERIVATIVES_TABLE.replace('.tsv', '.json')}` describes its columns and units.\n"
        "- `sub-<label>/[ses-<label>/]figures/<entities>_desc-brainage_T1w.png`: the QC image of each scan that was "
        "preprocessed (the slice predicted, with its brain-mask outline).\n"
        f"- `{REPORT_NAME}`: the cohort report (one self-contained HTML page: every scan's QC picture, age, "
        "interval, brain-PAD and flags).\n\n"
        "`.bidsignore` lists these outputs, which the BIDS specification has no file rules for.\n"
    )


def write_derivatives(rows: list[dict], source_root: str | Path, out_dir: str | Path, generator: dict) -> Path:
    """A BIDS-derivatives dataset at ``out_dir`` from inference rows of a BIDS input.

    Writes ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``), a ``README.md``, the
    group table ``brainage.tsv`` (one row per image, ``n/a`` where a value is absent) with its column sidecar
    ``brainage.json``, each scan's QC image as ``sub-*/[ses-*/]figures/<entities>_desc-brainage_T1w.png``, and a
    ``.bidsignore`` listing the table and the figures (:data:`DERIVATIVES_BIDSIGNORE`).
    """
    out, source_root = Path(out_dir), Path(source_root).expanduser().resolve()
    write_text(out / ".bidsignore", "\n".join(DERIVATIVES_BIDSIGNORE) + "\n")
    write_text(out / "README.md", _derivatives_readme(generator, source_root))
    write_json(
        out / "dataset_description.json",
        {
            "Name": f"{generator['Name']} predictions",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [generator],
            "SourceDatasets": [{"URL": source_root.as_uri()}],
        },
    )
    always = ("participant_id", "source", "predicted_age")
    columns = [c for c in COLUMN_DESCRIPTIONS if c in always or any(str(r.get(c, "")) != "" for r in rows)]
    table = []
    for row in rows:
        entry = {c: row.get(c, "") for c in columns}
        source = Path(str(row.get("image", "")))
        entry["source"] = str(source.relative_to(source_root)) if source.is_relative_to(source_root) else str(source)
        qc = row.get("qc")
        if qc and Path(qc).is_file():
            session = [safe_name(row["session_id"])] if row.get("session_id") else []
            folder = out.joinpath(safe_name(row["participant_id"]), *session, "figures")
            target = folder / f"{safe_name(row['subject'])}_desc-brainage_T1w.png"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(qc, target)
            entry["qc"] = str(target.relative_to(out))
        table.append({c: ("n/a" if entry.get(c, "") == "" else entry[c]) for c in columns})
    write_csv(out / DERIVATIVES_TABLE, table, columns, delimiter="\t")
    write_json(out / DERIVATIVES_TABLE.replace(".tsv", ".json"), {c: COLUMN_DESCRIPTIONS[c] for c in columns})
    return out
