"""Plots and image grids for the docs, QC and the paper's figures.

Every function writes a PNG and returns its path; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts import cli  # noqa: E402


def show_slice(ax, image: np.ndarray, title: str | None = None, vmax: float = 1.0) -> None:
    """Draw an ``[x, y]``-indexed MNI slice the radiological way up (anterior at the top)."""
    ax.imshow(np.asarray(image).T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def phantom_montage(out: str | Path, ages=(20, 30, 40, 50, 60, 70, 80, 90), seed: int = 0, subject_index: int = 0) -> Path:
    """Medial slices of one phantom subject rendered at increasing brain ages, at both grades."""
    from scripts import synthetic

    subject = synthetic.sample_cohort(synthetic.CohortSpec(n=max(subject_index + 1, 2), seed=seed))[subject_index]
    grades = list(synthetic.GRADES)
    fig, axes = plt.subplots(len(grades), len(ages), figsize=(1.9 * len(ages), 2.0 * len(grades) + 0.5), squeeze=False)
    for row, grade in enumerate(grades):
        for col, age in enumerate(ages):
            person = replace(subject, brain_age=float(age), age=float(age), grade=grade)
            show_slice(axes[row, col], synthetic.render_slice(person)[0], f"brain age {age}" if row == 0 else None)
        axes[row, 0].text(-0.08, 0.5, grade, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(f"Synthetic phantom: one subject (seed {seed}) rendered at brain ages {ages[0]}-{ages[-1]}", fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def qc_slice(image: np.ndarray, mask: np.ndarray | None, out: str | Path, title: str | None = None) -> Path:
    """A preprocessed slice ``(C, H, W)`` (centre channel) with its brain-mask outline in red."""
    centre = image.shape[0] // 2
    fig, ax = plt.subplots(figsize=(2.4, 2.6))
    show_slice(ax, image[centre], title)
    if mask is not None and 0.0 < float(np.mean(mask[centre] > 0.5)) < 1.0:
        ax.contour(np.asarray(mask[centre]).T, levels=[0.5], colors="red", linewidths=0.6)
    fig.tight_layout(pad=0.3)
    return _save(fig, out)


def qc_montage(pngs: list[str | Path], out: str | Path, title: str, columns: int = 8) -> Path:
    """Tile per-scan QC images (:func:`qc_slice`) into one overview of a preprocessing run."""
    rows = max(1, -(-len(pngs) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.75 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, png in zip(axes.ravel(), pngs):
        ax.imshow(plt.imread(png))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.2)
    return _save(fig, out)


def prediction_scatter(predicted, age, out: str | Path, metrics: dict | None = None, title: str | None = None) -> Path:
    """Predicted against chronological age with the identity line and the accuracy in the legend."""
    predicted, age = np.asarray(predicted, dtype=float), np.asarray(age, dtype=float)
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    label = None
    if metrics:
        label = f"r = {metrics['r']:.2f}, MAE = {metrics['mae']:.1f} y, R$^2$ = {metrics['r2']:.2f} (n = {metrics['n']})"
    ax.scatter(age, predicted, s=14, alpha=0.7, label=label)
    low = float(min(age.min(), predicted.min())) - 2
    high = float(max(age.max(), predicted.max())) + 2
    ax.plot([low, high], [low, high], color="0.4", lw=1, ls="--", label="predicted = chronological")
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="chronological age (years)", ylabel="predicted brain age (years)",
           title=title or "Brain age: predicted vs chronological")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m scripts.figures", description="Make the bundle's figures.")
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("phantom-montage", help="medial slices of one phantom subject across brain ages, both grades")
    p.add_argument("--out", default="docs/figures/phantom_montage.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0, help="cohort seed")
    p.add_argument("--subject-index", type=cli.non_negative_int, default=0, help="which subject of the cohort")
    args = parser.parse_args(argv)
    if args.figure == "phantom-montage":
        print(phantom_montage(args.out, seed=args.seed, subject_index=args.subject_index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
