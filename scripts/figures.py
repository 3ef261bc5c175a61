"""Plots and image grids for the docs, QC and the paper's figures.

Every function writes a PNG and returns its path (the plots return the PNG's bytes instead when ``out`` is None, for
a page that inlines its images); matplotlib runs headless (Agg). Drawing only: the modules that compute what is
drawn (preprocess, statistics, generative, phantom, report) call these, never the other way round.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scripts.atomic import write_atomic  # noqa: E402


def show_slice(ax, image: np.ndarray, title: str | None = None, vmax: float = 1.0) -> None:
    """Draw an ``[x, y]``-indexed MNI slice the radiological way up (anterior at the top)."""
    ax.imshow(np.asarray(image).T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def qc_slice(image: np.ndarray, mask: np.ndarray | None, out: str | Path, title: str | None = None) -> Path:
    """A preprocessed slice ``(C, H, W)`` (centre channel) with its brain-mask outline in red."""
    centre = image.shape[0] // 2
    fig, ax = plt.subplots(figsize=(2.4, 2.6))
    show_slice(ax, image[centre], title)
    if mask is not None and 0.0 < float(np.mean(mask[centre] > 0.5)) < 1.0:
        ax.contour(np.asarray(mask[centre]).T, levels=[0.5], colors="red", linewidths=0.6)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, out)


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
    return save_figure(fig, out)


def paired_slices(rows: list[tuple[str, np.ndarray, np.ndarray]], out: str | Path, names=("a", "b")) -> Path:
    """Two renderings of each slice side by side with their difference: ``rows`` of ``(label, a, b)``."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.2, 2.5 * len(rows)), squeeze=False)
    for (label, a, b), ax in zip(rows, axes):
        show_slice(ax[0], a, f"{label}: {names[0]}")
        show_slice(ax[1], b, names[1])
        ax[2].imshow((np.asarray(b) - np.asarray(a)).T, origin="lower", cmap="coolwarm", vmin=-0.3, vmax=0.3)
        ax[2].set_axis_off()
        ax[2].set_title(f"{names[1]} - {names[0]} (+-0.3)", fontsize=9)
    fig.tight_layout(pad=0.3)
    return save_figure(fig, out)


def _scatter_by_group(ax, x, y, groups=None, **style) -> None:
    """``ax.scatter`` of ``x, y``, one colour per value of ``groups`` (labels per point) and a legend entry each."""
    if groups is None:
        ax.scatter(x, y, **style)
        return
    groups = np.asarray(groups, dtype=str)
    for name in sorted(set(groups.tolist())):
        ax.scatter(x[groups == name], y[groups == name], **{**style, "label": name})


def prediction_scatter(
    predicted, age, out: str | Path | None = None, metrics: dict | None = None, title: str | None = None, groups=None
) -> Path | bytes:
    """Predicted against chronological age with the identity line and the accuracy in the legend; ``groups`` (a
    label per scan, e.g. the grade) colours the points."""
    predicted, age = np.asarray(predicted, dtype=float), np.asarray(age, dtype=float)
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    label = None
    if metrics:
        label = (
            f"r = {metrics['r']:.2f}, MAE = {metrics['mae']:.1f} y, R$^2$ = {metrics['r2']:.2f} (n = {metrics['n']})"
        )
    _scatter_by_group(ax, age, predicted, groups, s=14, alpha=0.7, label=label)
    low = float(min(age.min(), predicted.min())) - 2
    high = float(max(age.max(), predicted.max())) + 2
    ax.plot([low, high], [low, high], color="0.4", lw=1, ls="--", label="predicted = chronological")
    ax.set(
        xlim=(low, high),
        ylim=(low, high),
        xlabel="chronological age (years)",
        ylabel="predicted brain age (years)",
        title=title or "Brain age: predicted vs chronological",
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _output(fig, out)


def pad_boxplot(
    pads: dict, out: str | Path | None = None, stats: dict | None = None, title: str | None = None
) -> Path | bytes:
    """Brain-PAD distribution per model (paper Figure 2): a box per model, every subject as a point.

    ``stats``: per-model results of ``scripts.statistics.compare_pad_distributions``, printed under the names.
    """
    names = list(pads)
    fig, ax = plt.subplots(figsize=(1.8 + 1.5 * len(names), 4.4))
    ax.boxplot([np.asarray(pads[name], dtype=float) for name in names], showfliers=False, widths=0.5)
    jitter = np.random.default_rng(0)
    for position, name in enumerate(names, start=1):
        values = np.asarray(pads[name], dtype=float)
        ax.scatter(position + jitter.uniform(-0.14, 0.14, len(values)), values, s=9, alpha=0.45, zorder=3)
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    labels = []
    for name in names:
        label = f"{name}\nn = {len(pads[name])}"
        entry = (stats or {}).get(name, {})
        if entry.get("ks_statistic") is not None:
            label += f"\nKS D = {entry['ks_statistic']:.2f}, p = {entry['ks_p']:.1e}"
        labels.append(label)
    ax.set_xticks(range(1, len(names) + 1), labels, fontsize=8)
    ax.set_ylabel("brain-PAD (years)")
    ax.set_title(title or "Brain-PAD by model", fontsize=9)
    fig.tight_layout()
    return _output(fig, out)


def reconstruction_grid(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    out: str | Path,
    labels: list[str] | None = None,
    title: str | None = None,
    swapped: np.ndarray | None = None,
) -> Path:
    """Originals, their reconstructions and the absolute error (paper Figure 4); images are (N, C, H, W).

    With ``swapped`` (each image's x_end decoded with the next image's z_sem) two more rows show that control and
    its error: the latent is at work only where the swapped row is visibly worse than the reconstruction.
    """
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    centre = originals.shape[1] // 2
    errors = np.abs(reconstructions - originals)[:, centre]
    rows = [("original", None), ("reconstruction\n(own z)", None), ("|error|", errors)]
    # one error scale for both rows, set by the own-z errors (a control that leaves the data range saturates it)
    vmax_error = max(4 * float(np.percentile(errors, 99.5)), 1e-6)
    if swapped is not None:
        swapped = np.asarray(swapped)
        swapped_errors = np.abs(swapped - originals)[:, centre]
        rows += [("control:\nnext image's z", None), ("|error|\n(control)", swapped_errors)]
    n = len(originals)
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n + 1.4, 2.35 * len(rows)), squeeze=False)
    for i in range(n):
        show_slice(axes[0, i], originals[i, centre], labels[i] if labels else None)
        own_error = np.abs(reconstructions[i, centre] - originals[i, centre])
        show_slice(
            axes[1, i],
            np.clip(reconstructions[i, centre], 0.0, 1.0),
            f"MSE {np.mean(own_error ** 2):.1e}, MAE {np.mean(own_error):.3f}",
        )
        shown = axes[2, i].imshow(
            own_error.T, origin="lower", cmap="magma", vmin=0.0, vmax=vmax_error, interpolation="nearest"
        )
        axes[2, i].set_axis_off()
        if swapped is not None:
            control_error = np.abs(swapped[i, centre] - originals[i, centre])
            show_slice(
                axes[3, i],
                np.clip(swapped[i, centre], 0.0, 1.0),
                f"MSE {np.mean(control_error ** 2):.1e}, MAE {np.mean(control_error):.3f}",
            )
            axes[4, i].imshow(
                control_error.T, origin="lower", cmap="magma", vmin=0.0, vmax=vmax_error, interpolation="nearest"
            )
            axes[4, i].set_axis_off()
    for row, (name, _) in enumerate(rows):
        axes[row, 0].text(
            -0.06, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.colorbar(
        shown, ax=axes.ravel().tolist(), fraction=0.015, pad=0.015, extend="max", label="absolute error (intensity)"
    )
    fig.suptitle(title or "Reconstructions", fontsize=10)
    return save_figure(fig, out)


def generation_grid(
    originals: np.ndarray,
    decodes: np.ndarray,
    nearest,
    out: str | Path,
    labels: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Generation from z alone: the originals above, the decodes of one shared x_end with each z below.

    Each decode is titled with the original it is closest to (green when its own, red otherwise).
    """
    originals, decodes = np.asarray(originals), np.asarray(decodes)
    centre = originals.shape[1] // 2
    n = len(originals)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 1.0, 4.6), squeeze=False)
    for i in range(n):
        show_slice(axes[0, i], originals[i, centre], labels[i] if labels else None)
        show_slice(axes[1, i], np.clip(decodes[i, centre], 0.0, 1.0))
        own = int(nearest[i]) == i
        axes[1, i].set_title(
            "nearest: own" if own else f"nearest: #{int(nearest[i]) + 1}",
            fontsize=8,
            color="tab:green" if own else "tab:red",
        )
    for row, name in enumerate(("original", "decoded from z\n(shared x_end)")):
        axes[row, 0].text(
            -0.06, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.suptitle(title or "Generation from z_sem alone", fontsize=10)
    return save_figure(fig, out)


def interpolation_grid(
    frames: np.ndarray,
    ages,
    out: str | Path,
    reencoded_ages=None,
    title: str | None = None,
    control_frames: np.ndarray | None = None,
    control_ages=None,
) -> Path:
    """Decoded frames of a latent interpolation in a row, each titled with its ages (paper Figure 3).

    ``control_frames`` (the same x_end path with z held at the first frame's z) go in a second row: whatever
    changes there comes from x_end, not from the latent.
    """
    frames = np.asarray(frames)
    centre = frames.shape[1] // 2
    n = len(frames)
    rows = 1 if control_frames is None else 2
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n + 0.6, 2.7 * rows), squeeze=False)
    for i, ax in enumerate(axes[0]):
        label = f"z: {float(ages[i]):.1f} y"
        if reencoded_ages is not None:
            label += f"\nimage: {float(reencoded_ages[i]):.1f} y"
        show_slice(ax, np.clip(frames[i, centre], 0.0, 1.0), label)
    if control_frames is not None:
        control_frames = np.asarray(control_frames)
        for i, ax in enumerate(axes[1]):
            label = None if control_ages is None else f"image: {float(control_ages[i]):.1f} y"
            show_slice(ax, np.clip(control_frames[i, centre], 0.0, 1.0), label)
        for row, name in enumerate(("z and x_end", "control: x_end only")):
            axes[row, 0].text(
                -0.06, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8
            )
    fig.suptitle(title or "Age interpolation", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def counterfactual_grid(
    frames: np.ndarray,
    differences: np.ndarray,
    out: str | Path,
    labels: list[str] | None = None,
    title: str | None = None,
    control_frames: np.ndarray | None = None,
    control_differences: np.ndarray | None = None,
    control_labels: list[str] | None = None,
    reference: np.ndarray | None = None,
) -> Path:
    """Counterfactual ageing: decoded frames on top, their difference from the unshifted decoding below.

    Differences on a symmetric blue-red scale: red where the older-looking frame is brighter (CSF is dark on T1w,
    so ventricles and sulci widening with age show in blue). The control (a random latent direction of the same
    length) adds two rows on the same scale. ``reference`` (C, H, W), e.g. the phantom's true ageing over the
    same span, is drawn at the right of the last difference row.
    """
    frames, differences = np.asarray(frames), np.asarray(differences)
    centre = frames.shape[1] // 2
    maps = [differences[:, centre]]
    rows = [("decoded", "frame"), ("difference", "map")]
    if control_frames is not None:
        control_frames, control_differences = np.asarray(control_frames), np.asarray(control_differences)
        maps.append(control_differences[:, centre])
        rows += [("control:\nrandom direction", "control_frame"), ("difference\n(control)", "control_map")]
    limit = max(float(np.abs(np.concatenate(maps)).max()), 1e-6)
    n = len(frames)
    columns = n + (reference is not None)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns + 1.0, 2.3 * len(rows)), squeeze=False)
    for i in range(n):
        show_slice(axes[0, i], np.clip(frames[i, centre], 0.0, 1.0), labels[i] if labels else None)
        shown = axes[1, i].imshow(
            differences[i, centre].T, origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
        )
        axes[1, i].set_axis_off()
        if control_frames is not None:
            show_slice(
                axes[2, i], np.clip(control_frames[i, centre], 0.0, 1.0), control_labels[i] if control_labels else None
            )
            axes[3, i].imshow(
                control_differences[i, centre].T,
                origin="lower",
                cmap="RdBu_r",
                vmin=-limit,
                vmax=limit,
                interpolation="nearest",
            )
            axes[3, i].set_axis_off()
    if reference is not None:
        for row in range(len(rows)):
            axes[row, -1].set_axis_off()
        ref = np.asarray(reference)[np.asarray(reference).shape[0] // 2]
        ref_limit = max(float(np.abs(ref).max()), 1e-6)
        axes[1, -1].imshow(
            ref.T, origin="lower", cmap="RdBu_r", vmin=-ref_limit, vmax=ref_limit, interpolation="nearest"
        )
        axes[1, -1].set_title("true ageing\n(phantom)", fontsize=8)
    for row, (name, _) in enumerate(rows):
        axes[row, 0].text(
            -0.06, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8
        )
    fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="intensity change vs 0 y")
    fig.suptitle(title or "Counterfactual ageing", fontsize=10)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write a figure as PNG, atomically, and close it."""
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def _output(fig, out: str | Path | None) -> Path | bytes:
    """:func:`save_figure` to ``out``, or the figure as PNG bytes when ``out`` is None; the figure is closed."""
    if out is not None:
        return save_figure(fig, out)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def pad_outcome_scatter(pad, outcome, association: dict, out: str | Path | None = None) -> Path | bytes:
    """Brain-PAD against an outcome (e.g. survival in months), with ``association``'s Pearson r, p and n."""
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    ax.scatter(np.asarray(pad, dtype=float), np.asarray(outcome, dtype=float), s=12, alpha=0.7)
    ax.set(xlabel="brain-PAD (years)", ylabel="survival (months)")
    ax.set_title(f"r {association['r']:.2f}, p {association['p']:.2g}, n = {association['n']}", fontsize=9)
    fig.tight_layout()
    return _output(fig, out)


def bland_altman_plot(
    first, second, out: str | Path | None, stats: dict, labels=("first", "second"), groups=None
) -> Path | bytes:
    """Bland-Altman plot: difference against mean of two measurements, with the bias and limits of agreement
    (``stats``: :func:`scripts.statistics.bland_altman`, with ICC in the title where it holds ``icc_2_1``);
    ``groups`` colours the points."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    mean, difference = (a + b) / 2, b - a
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    _scatter_by_group(ax, mean, difference, groups, s=12, alpha=0.7)
    for value, style, name in (
        (stats["bias"], "-", f"bias {stats['bias']:+.2f}"),
        (stats["loa_lower"], "--", f"-1.96 sd {stats['loa_lower']:+.2f}"),
        (stats["loa_upper"], "--", f"+1.96 sd {stats['loa_upper']:+.2f}"),
    ):
        ax.axhline(value, color="black", linestyle=style, linewidth=0.8)
        ax.annotate(name, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7)
    ax.set_xlabel(f"mean of {labels[0]} and {labels[1]} (years)")
    ax.set_ylabel(f"{labels[1]} - {labels[0]} (years)")
    if "icc_2_1" in stats:
        ax.set_title(f"ICC(2,1) {stats['icc_2_1']:.3f}, ICC(3,1) {stats['icc_3_1']:.3f}, n = {stats['n']}", fontsize=9)
    if groups is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _output(fig, out)
