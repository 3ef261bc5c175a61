"""Statistics of brain-age predictions: accuracy metrics, age-bias correction, PAD associations, KS tests.

Brain-PAD (predicted age difference) = predicted age - chronological age. Regression to the mean makes
raw PADs correlate negatively with age; the bias corrections below remove that dependence using a fit
made on validation data only (never on the data being analysed), as the field requires. Accuracy is
always reported on the uncorrected predictions.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from scripts import cli
from scripts.atomic import write_json

BIAS_CORRECTION_METHODS = ("beheshti", "cole", "none")


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64).ravel()


def pearson_r(prediction, target) -> float:
    """Pearson correlation in float64; NaN when either side is constant (e.g. an untrained model).

    Takes tensors or arrays of any matching shape, so it also serves as an Ignite ``EpochMetric`` ``compute_fn``.
    """
    x, y = _as_array(prediction), _as_array(target)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if not denominator > 1e-12 * max(len(x), 1):
        return float("nan")
    return float((x * y).sum() / denominator)


def pearson_with_p(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value; NaNs when fewer than 3 pairs or a side is constant."""
    x, y = _as_array(x), _as_array(y)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class BiasCorrection:
    """Linear age-bias correction of brain-age predictions, fitted on validation data.

    * ``beheshti`` (Beheshti et al. 2019): regress PAD on age, ``PAD = slope * age + intercept``; the
      corrected PAD is the residual ``PAD - (slope * age + intercept)``.
    * ``cole`` (Cole et al. 2018; de Lange & Cole 2020): regress prediction on age,
      ``pred = slope * age + intercept``; corrected prediction ``(pred - intercept) / slope``.
    * ``none``: corrected = raw.
    """

    method: str
    slope: float = 0.0
    intercept: float = 0.0
    n: int = 0

    @classmethod
    def fit(cls, predicted_age, age, method: str = "beheshti") -> "BiasCorrection":
        if method not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"unknown bias correction {method!r}; choose from {', '.join(BIAS_CORRECTION_METHODS)}")
        pred, age = _as_array(predicted_age), _as_array(age)
        keep = np.isfinite(pred) & np.isfinite(age)
        pred, age = pred[keep], age[keep]
        if method == "none":
            return cls("none", n=len(age))
        if len(age) < 3 or np.ptp(age) == 0:
            raise ValueError(f"bias correction needs >= 3 labelled predictions with varying ages, got {len(age)}")
        target = pred - age if method == "beheshti" else pred
        slope, intercept = np.polyfit(age, target, 1)
        if method == "cole" and abs(slope) < 1e-3:
            raise ValueError(f"cole correction: predictions do not vary with age (slope {slope:.2g})")
        return cls(method, float(slope), float(intercept), int(len(age)))

    def corrected_pad(self, predicted_age, age) -> np.ndarray:
        pred, age = _as_array(predicted_age), _as_array(age)
        if self.method == "beheshti":
            return pred - age - (self.slope * age + self.intercept)
        if self.method == "cole":
            return (pred - self.intercept) / self.slope - age
        return pred - age

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically."""
        write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "BiasCorrection":
        data = json.loads(Path(path).read_text())
        if data.get("method") not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"{path}: not a bias-correction file (method {data.get('method')!r})")
        return cls(str(data["method"]), float(data["slope"]), float(data["intercept"]), int(data.get("n", 0)))


def bias_correction_path(ckpt_path: str | Path) -> Path:
    """Where the correction fitted for a checkpoint lives: beside it, ``<stem>_bias_correction.json``."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}_bias_correction.json")


def regression_metrics(predicted_age, age, correction: BiasCorrection | None = None) -> dict[str, float]:
    """Accuracy of (uncorrected) predictions and the age dependence of PAD before/after correction."""
    pred, age = _as_array(predicted_age), _as_array(age)
    keep = np.isfinite(pred) & np.isfinite(age)
    pred, age = pred[keep], age[keep]
    n = int(len(age))
    if n == 0:
        raise ValueError("no labelled predictions to evaluate")
    pad = pred - age
    r, p = pearson_with_p(pred, age)
    ss_res = float(((age - pred) ** 2).sum())
    ss_tot = float(((age - age.mean()) ** 2).sum())
    metrics = {
        "n": n,
        "r": r,
        "r_p": p,
        "mae": float(np.abs(pad).mean()),
        "rmse": float(math.sqrt((pad**2).mean())),
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        "pad_mean": float(pad.mean()),
        "pad_std": float(pad.std(ddof=1)) if n > 1 else float("nan"),
        "pad_age_r": pearson_with_p(pad, age)[0],
        "mean_age_mae": float(np.abs(age - age.mean()).mean()),  # predicting everyone the mean age
    }
    if correction is not None:
        corrected = correction.corrected_pad(pred, age)
        metrics.update({
            "bias_correction": correction.method,
            "pad_corrected_mean": float(corrected.mean()),
            "pad_corrected_std": float(corrected.std(ddof=1)) if n > 1 else float("nan"),
            "pad_corrected_age_r": pearson_with_p(corrected, age)[0],
        })
    return metrics


METRIC_LABELS = {
    "n": "n (labelled)",
    "r": "Pearson r (predicted, age)",
    "r_p": "p-value of r",
    "mae": "MAE (years)",
    "rmse": "RMSE (years)",
    "r2": "R2",
    "pad_mean": "brain-PAD mean (years)",
    "pad_std": "brain-PAD std (years)",
    "pad_age_r": "corr(brain-PAD, age)",
    "pad_corrected_mean": "corrected PAD mean (years)",
    "pad_corrected_std": "corrected PAD std (years)",
    "pad_corrected_age_r": "corr(corrected PAD, age)",
    "mean_age_mae": "MAE of predicting the mean age",
}


def format_table(metrics: dict, title: str = "") -> str:
    """A plain-text two-column table of the metrics, in a fixed order."""
    lines = [title] if title else []
    width = max(len(label) for label in METRIC_LABELS.values())
    for key, label in METRIC_LABELS.items():
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "n":
            shown = str(value)
        elif key == "r_p":
            shown = f"{value:.2e}"
        else:
            shown = f"{value:.3f}"
        lines.append(f"  {label:<{width}}  {shown}")
    if "bias_correction" in metrics:
        lines.append(f"  (bias correction: {metrics['bias_correction']}, fitted on validation data)")
    return "\n".join(lines)


def evaluate_predictions(predictions_csv: str | Path, output_dir: str | Path,
                         correction_path: str | Path | None = None) -> dict:
    """Metrics of a predictions.csv: ``OUT/metrics.json``, ``OUT/scatter.png`` and a printed table."""
    from scripts.figures import prediction_scatter
    from scripts.inference import read_predictions

    rows = [r for r in read_predictions(predictions_csv) if np.isfinite(r["age"]) and np.isfinite(r["predicted_age"])]
    if not rows:
        raise SystemExit(f"{predictions_csv}: no prediction with a known age to evaluate")
    correction = BiasCorrection.load(correction_path) if correction_path and Path(correction_path).is_file() else None
    predicted = np.array([r["predicted_age"] for r in rows])
    age = np.array([r["age"] for r in rows])
    metrics = regression_metrics(predicted, age, correction)
    out = Path(output_dir)
    write_json(out / "metrics.json", metrics)
    prediction_scatter(predicted, age, out / "scatter.png", metrics)
    print(format_table(metrics, f"Brain-age accuracy on {predictions_csv} (uncorrected predictions)"))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Brain-PAD against outcomes and between models (paper: Table 1's last row, Table 2, Figure 2).
# ---------------------------------------------------------------------------------------------------------------

MISSING_VALUES = ("", "n/a", "na", "nan")


def _select(rows: list[dict], split: str | None) -> list[dict]:
    if not rows:
        raise ValueError("no predictions")
    if split is None:
        return rows
    selected = [row for row in rows if row.get("split") == split]
    if not selected:
        found = sorted({str(row.get("split", "")) for row in rows})
        raise ValueError(f"no predictions in split {split!r} (splits: {', '.join(found)})")
    return selected


def _column(rows: list[dict], column: str) -> np.ndarray:
    """One column as float64, NaN where empty; extra predictions.csv columns arrive as text."""
    if not any(column in row for row in rows):
        raise ValueError(f"no column {column!r} in the predictions (columns: {', '.join(rows[0])})")
    values = []
    for row in rows:
        value = row.get(column)
        if value is None or (isinstance(value, str) and value.strip().lower() in MISSING_VALUES):
            values.append(math.nan)
            continue
        try:
            values.append(float(value))
        except ValueError:
            raise ValueError(f"column {column!r} of subject {row.get('subject', '?')}: {value!r} is not a number") from None
    return np.asarray(values, dtype=np.float64)


def pad_outcome_association(rows: list[dict], outcome: str = "survival_months", pad: str = "brain_pad",
                            split: str | None = None) -> dict:
    """Pearson r (and p) between brain-PAD and an outcome such as survival: the paper's Table 1, last row.

    ``rows`` as :func:`scripts.inference.read_predictions` returns them; rows lacking either value are left out
    and ``n`` counts the pairs used; ``split`` keeps the rows of one datalist split (e.g. ``disease``).
    """
    rows = _select(rows, split)
    x, y = _column(rows, pad), _column(rows, outcome)
    keep = np.isfinite(x) & np.isfinite(y)
    r, p = pearson_with_p(x[keep], y[keep])
    return {"r": r, "p": p, "n": int(keep.sum()), "outcome": outcome, "pad": pad, "split": split}


def compare_pad_distributions(named_rows: dict[str, list[dict]], reference: str | None = None,
                              pad: str = "brain_pad", split: str | dict[str, str] | None = None,
                              boxplot: str | Path | None = None) -> dict:
    """Brain-PAD mean, std and n per model, and the two-sample Kolmogorov-Smirnov test of each against a reference.

    The paper's Table 2 (and, with ``boxplot`` a PNG path, its Figure 2): whether the models' PAD distributions on
    one cohort differ, not only their means. ``reference`` defaults to the first model; its own KS entries are None.
    ``split`` is one split for every model or ``{name: split}``, e.g. to compare one model's healthy and disease
    cohorts.
    """
    if len(named_rows) < 2:
        raise ValueError(f"comparing PAD distributions needs at least two models, got {len(named_rows)}")
    reference = next(iter(named_rows)) if reference is None else reference
    if reference not in named_rows:
        raise ValueError(f"reference {reference!r} is not one of the models ({', '.join(named_rows)})")
    splits = split if isinstance(split, dict) else dict.fromkeys(named_rows, split)
    pads = {}
    for name, rows in named_rows.items():
        values = _column(_select(rows, splits.get(name)), pad)
        pads[name] = values[np.isfinite(values)]
        if len(pads[name]) == 0:
            raise ValueError(f"{name}: no {pad} values" + (f" in split {splits[name]!r}" if splits.get(name) else ""))
    models = {}
    for name, values in pads.items():
        models[name] = {
            "n": int(len(values)),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "ks_statistic": None,
            "ks_p": None,
        }
        if name != reference:
            ks = stats.ks_2samp(values, pads[reference])
            models[name].update(ks_statistic=float(ks.statistic), ks_p=float(ks.pvalue))
    result = {"reference": reference, "pad": pad, "split": split, "models": models}
    if boxplot is not None:
        from scripts.figures import pad_boxplot

        pad_boxplot(pads, boxplot, models, title=f"{pad} by model{_where(split).replace(' (', chr(10) + '(', 1)}")
    return result


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)) for line in [header, *rows]]
    return "\n".join("  " + line for line in lines)


def _number(value, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _where(split: str | dict | None) -> str:
    if isinstance(split, dict):
        return " (splits: " + ", ".join(f"{name}: {value}" for name, value in split.items()) + ")"
    return f" (split {split!r})" if split else ""


def format_association(result: dict) -> str:
    return (f"corr({result['pad']}, {result['outcome']}){_where(result['split'])}: r = {_number(result['r'], '.3f')}, "
            f"p = {_number(result['p'], '.2e')}, n = {result['n']}")


def format_pad_table(result: dict) -> str:
    """Table 2 as plain text: one row per model, KS against the reference."""
    rows = [[name, str(m["n"]), _number(m["mean"]), _number(m["std"]), _number(m["ks_statistic"], ".3f"),
             _number(m["ks_p"], ".2e")] for name, m in result["models"].items()]
    title = f"{result['pad']} distributions{_where(result['split'])}, two-sample KS against {result['reference']!r}"
    return title + "\n" + _text_table(["model", "n", "mean", "std", "KS D", "KS p"], rows)


# ---------------------------------------------------------------------------------------------------------------
# What the generative half encodes (paper: Figure 4 reconstructions, Figure 3 age interpolations).
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode for the duration (dropout would make the DDIM maps random), then the caller's mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _in_batches(function, batch_size: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply ``function`` to matching chunks of ``tensors`` (split on dim 0); concatenate its outputs on the CPU."""
    outputs = [function(*chunk) for chunk in zip(*(t.split(batch_size) for t in tensors))]
    return tuple(torch.cat([out[i].cpu() for out in outputs]) for i in range(len(outputs[0])))


def _ddim_maps(model: torch.nn.Module, ddim_steps: int, autocast_dtype: torch.dtype | str | None):
    """(encode: x0 -> (z_sem, x_T), decode: (z_sem, x_T) -> x0) on the model's device, float32 in and out."""
    from scripts.engine import _autocast, ddim_decode, ddim_encode, ddim_scheduler

    scheduler = ddim_scheduler(ddim_steps)
    device = next(model.parameters()).device

    def encode(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0.to(device, torch.float32)
        with _autocast(device, autocast_dtype):
            z_sem = model.encode(x0).float()
            return z_sem, ddim_encode(model, x0, z_sem, scheduler)

    def decode(z_sem: torch.Tensor, x_T: torch.Tensor) -> tuple[torch.Tensor]:
        with _autocast(device, autocast_dtype):
            return (ddim_decode(model, x_T.to(device, torch.float32), z_sem.to(device), scheduler),)

    return encode, decode


@torch.no_grad()
def reconstruct(model: torch.nn.Module, images: torch.Tensor, ddim_steps: int = 50, batch_size: int = 8,
                autocast_dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """Encode images to (z_sem, x_T) and decode them back: the paper's Figure 4.

    x_T comes from the deterministic DDIM inversion of x0 given z_sem (``scripts.engine.ddim_encode``), so the
    round trip measures how well eps_theta and z_sem describe the image. Runs on the model's device, in eval mode,
    in float32 unless ``autocast_dtype`` is given (DDIM inversion accumulates rounding error over its steps).

    Returns CPU tensors: ``z_sem`` (N, z_dim), ``x_T`` and ``reconstructions`` (shape of ``images``), and the
    per-image ``mse`` and ``mae`` of the reconstruction in the images' intensity units ([0, 1] for slices).
    """
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype)
        z_sem, x_T = _in_batches(encode, batch_size, images)
        (reconstructions,) = _in_batches(decode, batch_size, z_sem, x_T)
    difference = reconstructions - images.detach().cpu().float()
    return {
        "z_sem": z_sem,
        "x_T": x_T,
        "reconstructions": reconstructions,
        "mse": difference.pow(2).flatten(1).mean(1),
        "mae": difference.abs().flatten(1).mean(1),
    }


def slerp(start: torch.Tensor, end: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two tensors (each one vector) at ``weights`` in [0, 1]; (K, *start.shape).

    Used for x_T as in diffae: Gaussian noise lives near a sphere, and a straight line between two noise samples
    would pass through lower-norm, atypical noise half-way. Computed in float64; (anti)parallel ends fall back to
    the straight line.
    """
    a, b = start.flatten().double(), end.flatten().double()
    w = torch.as_tensor(weights, dtype=torch.float64, device=a.device)[:, None]
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1.0, 1.0))
    if torch.sin(theta) < 1e-6:
        mixed = (1 - w) * a + w * b
    else:
        mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return mixed.reshape(-1, *start.shape).to(start.dtype)


@torch.no_grad()
def interpolate(model: torch.nn.Module, young: torch.Tensor, old: torch.Tensor, n_frames: int = 7,
                ddim_steps: int = 50, batch_size: int = 8,
                autocast_dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """Decode a path between two images, z_sem linearly and x_T spherically interpolated: the paper's Figure 3.

    ``young``/``old`` are single images (C, H, W). The first and last frames are the two images' reconstructions.
    ``predicted_age`` is the age head applied to each frame's interpolated z_sem (what the model believes along
    the path; at the ends, its predictions for the two images); ``reencoded_age`` is the age predicted from the
    decoded frame itself, which says whether the ageing shows in the image and not only in the latent.
    Returns CPU tensors ``weights`` (K,), ``z_sem``, ``x_T``, ``frames`` (K, C, H, W) and the two ages (K,).
    """
    if n_frames < 2:
        raise ValueError(f"an interpolation needs at least 2 frames, got {n_frames}")
    device = next(model.parameters()).device
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype)
        ends_z, ends_x_T = _in_batches(encode, batch_size, torch.stack([young, old]))
        weights = torch.linspace(0.0, 1.0, n_frames)
        z_sem = torch.lerp(ends_z[0], ends_z[1], weights[:, None])
        x_T = slerp(ends_x_T[0], ends_x_T[1], weights)
        (frames,) = _in_batches(decode, batch_size, z_sem, x_T)
        predicted_age = model.age_head(z_sem.to(device)).cpu()
        (reencoded_age,) = _in_batches(lambda x: (model.predict_age(x.to(device)),), batch_size, frames)
    return {"weights": weights, "z_sem": z_sem, "x_T": x_T, "frames": frames,
            "predicted_age": predicted_age, "reencoded_age": reencoded_age}


def age_direction_shift(age_head: torch.nn.Module, z_sem: torch.Tensor, target_age: float,
                        latent_scale: torch.Tensor | None = None, max_iterations: int = 50,
                        tolerance: float = 0.05) -> tuple[torch.Tensor, float]:
    """Move ``z_sem`` (z_dim,) along the direction the age head reads until the head says ``target_age``.

    Newton steps along the head's gradient g, re-linearised at every step because the head (ReLU, BatchNorm) is
    only piecewise linear: ``z <- z + (target - head(z)) * d / (g . d)`` with ``d = latent_scale**2 * g``, the
    gradient measured in units of how much each latent dimension varies between subjects (``latent_scale``: the
    per-dimension standard deviation of z_sem over a cohort; None: raw units). Without the scale, the smallest
    move in raw units follows the few dimensions the head's BatchNorm amplifies most, which barely vary between
    real subjects and which the decoder may ignore. Returns the shifted latent and the age the head gives it
    (short of the target where the head saturates).
    """
    z = z_sem.detach().clone().float()[None]
    scale2 = None if latent_scale is None else latent_scale.detach().float().to(z.device).pow(2)[None]
    with torch.enable_grad():
        for _ in range(max_iterations):
            z.requires_grad_(True)
            age = age_head(z)[0]
            if abs(float(age.detach()) - target_age) <= tolerance:
                break
            (gradient,) = torch.autograd.grad(age, z)
            direction = gradient if scale2 is None else scale2 * gradient
            slope = float((gradient * direction).sum())
            if slope < 1e-12:  # flat region: the head cannot be moved from here
                break
            z = (z + (target_age - age.detach()) * direction / slope).detach()
        z = z.detach()
    return z[0], float(age_head(z)[0])


@torch.no_grad()
def counterfactual_ageing(model: torch.nn.Module, image: torch.Tensor, deltas=(-20, -10, 0, 10, 20),
                          ddim_steps: int = 50, batch_size: int = 8,
                          autocast_dtype: torch.dtype | str | None = None,
                          latent_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The same brain decoded younger and older: z_sem moved along the age head's direction, x_T kept.

    ``image`` (C, H, W) is encoded once (z_sem and its DDIM-inverted x_T); for each ``delta`` (years relative to
    the model's own prediction for the image) z_sem is shifted with :func:`age_direction_shift` and decoded with
    the subject's x_T, so what changes between frames is only what the latent change means. ``differences`` are
    each frame minus the unshifted (delta 0) decoding, i.e. the ageing the model has learnt, not reconstruction
    error. ``reencoded_age`` re-reads each decoded frame through encoder and head: whether the change is visible.
    Returns CPU tensors ``deltas``, ``target_age``, ``latent_age`` (what the head gives the shifted z),
    ``reencoded_age``, ``latent_shift`` (|dz|, in units of ``latent_scale`` when given), ``frames`` and
    ``differences`` (K, C, H, W). ``latent_scale``: see :func:`age_direction_shift` (:func:`latent_spread` gives it).
    """
    deltas = torch.as_tensor(deltas, dtype=torch.float32)
    if deltas.ndim != 1 or len(deltas) == 0:
        raise ValueError("deltas must be a non-empty list of years")
    device = next(model.parameters()).device
    with _eval_mode(model):
        encode, decode = _ddim_maps(model, ddim_steps, autocast_dtype)
        z0, x_T = _in_batches(encode, batch_size, image[None])
        head = model.age_head
        predicted = float(head(z0.to(device))[0])
        shifted = [age_direction_shift(head, z0[0].to(device), predicted + float(d), latent_scale) for d in deltas]
        z_sem = torch.stack([z for z, _ in shifted]).cpu()
        (frames,) = _in_batches(decode, batch_size, z_sem, x_T.expand(len(deltas), *x_T.shape[1:]))
        (reencoded_age,) = _in_batches(lambda x: (model.predict_age(x.to(device)),), batch_size, frames)
        # difference maps against the unshifted decoding (decoded separately when 0 is not among the deltas)
        zero = torch.nonzero(deltas == 0)
        baseline = frames[int(zero[0])] if len(zero) else decode(z0, x_T)[0].cpu()[0]
    return {"deltas": deltas, "predicted_age": torch.tensor(predicted), "target_age": predicted + deltas,
            "latent_age": torch.tensor([age for _, age in shifted]), "reencoded_age": reencoded_age,
            "latent_shift": ((z_sem - z0) / (1.0 if latent_scale is None else latent_scale.cpu())).norm(dim=1),
            "frames": frames, "differences": frames - baseline}


@torch.no_grad()
def latent_spread(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 32,
                  autocast_dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Per-dimension standard deviation of z_sem over a cohort of images: the unit latent moves are measured in."""
    if len(images) < 2:
        raise ValueError(f"the spread of z_sem needs at least 2 images, got {len(images)}")
    from scripts.engine import _autocast

    device = next(model.parameters()).device
    with _eval_mode(model):
        latents = []
        for chunk in images.split(batch_size):
            with _autocast(device, autocast_dtype):
                latents.append(model.encode(chunk.to(device)).float().cpu())
    return torch.cat(latents).std(0).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m scripts.analysis {metrics, association, ks, reconstruct, interpolate, counterfactual}
# ---------------------------------------------------------------------------------------------------------------

AUTOCAST_CHOICES = ("none", "bfloat16", "float16")


def load_model(config_file: str | Path, ckpt_path: str | Path | None = None, device: str | None = None):
    """The network a bundle config defines, with trained weights, in eval mode; and the config's slice transforms.

    Defaults (checkpoint, device) are the config's, so the analyses see the model exactly as inference does.
    """
    from monai.bundle import ConfigParser

    from scripts.inference import load_weights

    parser = ConfigParser()
    parser.read_config(str(config_file))
    if device is not None:
        parser["device"] = f"$torch.device({device!r})"
    network = parser.get_parsed_content("network_def")
    load_weights(network, ckpt_path or parser.get_parsed_content("ckpt_path"))
    network.to(parser.get_parsed_content("device")).eval()
    return network, parser.get_parsed_content("slice_transforms")


def config_ddim_steps(config_file: str | Path, default: int = 50) -> int:
    """The ``ddim_steps`` key of a bundle config (``configs/inference.yaml``: 50), or ``default``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    return int(parser.get_parsed_content("ddim_steps")) if "ddim_steps" in parser else default


def _load_slices(items: list[dict], transforms) -> torch.Tensor:
    """Model-input slices as one float32 (N, C, H, W) batch, through the config's own slice transforms."""
    from scripts.inference import is_model_input

    images = []
    for item in items:
        path = item["image"]
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if not is_model_input(path):
            raise ValueError(f"{path}: not a 128x128 MNI model-input slice; preprocess raw scans first "
                             "(python -m monai.bundle run preprocess --config_file configs/preprocess.yaml ...)")
        images.append(torch.as_tensor(transforms({"image": path})["image"], dtype=torch.float32))
    return torch.stack(images)


def _spread_by_age(items: list[dict], n: int) -> list[dict]:
    """``n`` items evenly spread from the youngest to the oldest labelled one (n = 1: the median age); the first
    ``n`` when fewer are labelled."""
    from scripts.data import is_labelled

    labelled = sorted((item for item in items if is_labelled(item)), key=lambda item: float(item["age"]))
    pool = labelled if len(labelled) >= n else items
    if len(pool) <= n:
        return pool
    positions = np.round(np.linspace(0, len(pool) - 1, n)) if n > 1 else [(len(pool) - 1) // 2]
    return [pool[int(i)] for i in positions]


def _describe(item: dict) -> dict:
    age = item.get("age")
    age = float(age) if age is not None and np.isfinite(float(age)) else None
    return {"subject": item.get("subject", ""), "image": str(item["image"]), "age": age, "grade": item.get("grade")}


def _label(info: dict) -> str:
    details = [f"{info['age']:.0f} y" if info["age"] is not None else None, info.get("grade")]
    details = [d for d in details if d]
    return info["subject"] + (f" ({', '.join(details)})" if details else "")


def _autocast_arg(args) -> str | None:
    return None if args.autocast_dtype == "none" else args.autocast_dtype


def _run_metrics(args) -> None:
    if args.bias_correction and not Path(args.bias_correction).is_file():
        raise FileNotFoundError(f"{args.bias_correction}: no such bias-correction file")
    evaluate_predictions(args.predictions, args.out, args.bias_correction)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'scatter.png'}")


def _run_association(args) -> None:
    from scripts.inference import read_predictions

    result = pad_outcome_association(read_predictions(args.predictions), args.outcome, args.pad, args.split)
    print(format_association(result))
    print(f"wrote {write_json(Path(args.out) / 'association.json', {**result, 'predictions': args.predictions})}")


def _run_ks(args) -> None:
    from scripts.inference import read_predictions

    names = args.names or [Path(path).parent.name or Path(path).stem for path in args.predictions]
    if len(names) != len(args.predictions):
        raise ValueError(f"--names gives {len(names)} names for {len(args.predictions)} predictions files")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {', '.join(names)}; set them with --names")
    splits = args.split or [None]
    if len(splits) not in (1, len(names)):
        raise ValueError(f"--split gives {len(splits)} splits for {len(names)} predictions files; give one or one per file")
    split = splits[0] if len(splits) == 1 else dict(zip(names, splits))
    named_rows = {name: read_predictions(path) for name, path in zip(names, args.predictions)}
    out = Path(args.out)
    result = compare_pad_distributions(named_rows, args.reference, args.pad, split, out / "pad_boxplot.png")
    result["predictions"] = dict(zip(names, args.predictions))
    print(format_pad_table(result))
    print(f"wrote {write_json(out / 'pad_distributions.json', result)} and {out / 'pad_boxplot.png'}")


def _run_reconstruct(args) -> None:
    from scripts.figures import reconstruction_grid
    from scripts.inference import resolve_inputs

    if len(args.n) not in (1, len(args.input)):
        raise ValueError(f"--n gives {len(args.n)} counts for {len(args.input)} inputs; give one or one per input")
    counts = args.n * len(args.input) if len(args.n) == 1 else args.n
    items = [item for source, n in zip(args.input, counts)
             for item in _spread_by_age(resolve_inputs(source, [args.split]), n)]
    model, transforms = load_model(args.config_file, args.ckpt_path, args.device)
    images = _load_slices(items, transforms)
    print(f"reconstructing {len(items)} images ({args.ddim_steps} DDIM steps each way)...")
    result = reconstruct(model, images, args.ddim_steps, args.batch_size, _autocast_arg(args))
    described = [{**_describe(item), "mse": float(mse), "mae": float(mae)}
                 for item, mse, mae in zip(items, result["mse"], result["mae"])]
    print(_text_table(["subject", "age", "grade", "MSE", "MAE"], [
        [d["subject"], _number(d["age"], ".1f"), d["grade"] or "-", f"{d['mse']:.2e}", f"{d['mae']:.4f}"]
        for d in described]))
    out = Path(args.out)
    png = reconstruction_grid(images.numpy(), result["reconstructions"].numpy(), out / "reconstructions.png",
                              labels=[_label(d) for d in described],
                              title=f"DDIM reconstructions ({args.ddim_steps} steps, deterministic encoding of x_T)")
    summary = {"ddim_steps": args.ddim_steps, "checkpoint": str(args.ckpt_path or "config default"),
               "mean_mse": float(result["mse"].mean()), "mean_mae": float(result["mae"].mean()), "images": described}
    print(f"wrote {png} and {write_json(out / 'reconstructions.json', summary)}")


def _run_interpolate(args) -> None:
    from scripts.data import subject_from_path
    from scripts.figures import interpolation_grid
    from scripts.inference import resolve_inputs

    if args.datalist:
        ends = _spread_by_age(resolve_inputs(args.datalist, [args.split]), 2)
        if len(ends) < 2 or any(_describe(item)["age"] is None for item in ends):
            raise ValueError(f"{args.datalist}: split {args.split!r} needs at least two labelled items")
    else:
        ends = [{"image": path, "subject": subject_from_path(path)} for path in (args.young, args.old)]
    model, transforms = load_model(args.config_file, args.ckpt_path, args.device)
    images = _load_slices(ends, transforms)
    print(f"interpolating {args.frames} frames ({args.ddim_steps} DDIM steps each way)...")
    result = interpolate(model, images[0], images[1], args.frames, args.ddim_steps, args.batch_size,
                         _autocast_arg(args))
    young, old = (_describe(item) for item in ends)
    frames = [{"weight": float(w), "predicted_age": float(a), "reencoded_age": float(r)}
              for w, a, r in zip(result["weights"], result["predicted_age"], result["reencoded_age"])]
    print(_text_table(["weight", "age from z (y)", "age re-encoded (y)"], [
        [f"{f['weight']:.2f}", f"{f['predicted_age']:.1f}", f"{f['reencoded_age']:.1f}"] for f in frames]))
    out = Path(args.out)
    png = interpolation_grid(result["frames"].numpy(), result["predicted_age"].numpy(), out / "interpolation.png",
                             reencoded_ages=result["reencoded_age"].numpy(),
                             title=f"{_label(young)} -> {_label(old)}: z_sem linear, x_T spherical interpolation")
    summary = {"ddim_steps": args.ddim_steps, "young": young, "old": old, "frames": frames}
    print(f"wrote {png} and {write_json(out / 'interpolation.json', summary)}")


def _run_counterfactual(args) -> None:
    from scripts.data import subject_from_path
    from scripts.figures import counterfactual_grid
    from scripts.inference import resolve_inputs

    cohort = resolve_inputs(args.datalist or args.reference, [args.split]) if (args.datalist or args.reference) else []
    if args.datalist:
        items = _spread_by_age(cohort, 1)
        if not items:
            raise ValueError(f"{args.datalist}: no items in split {args.split!r}")
    else:
        items = [{"image": args.image, "subject": subject_from_path(args.image)}]
    model, transforms = load_model(args.config_file, args.ckpt_path, args.device)
    image = _load_slices(items, transforms)[0]
    scale = None
    if cohort:
        reference = [cohort[int(i)] for i in np.linspace(0, len(cohort) - 1, min(len(cohort), args.reference_size))]
        scale = latent_spread(model, _load_slices(reference, transforms), args.batch_size, _autocast_arg(args))
        print(f"latent moves in units of the spread of z_sem over {len(reference)} {args.split} images")
    print(f"decoding {len(args.deltas)} counterfactual ages ({args.ddim_steps} DDIM steps each way)...")
    result = counterfactual_ageing(model, image, args.deltas, args.ddim_steps, args.batch_size, _autocast_arg(args),
                                   latent_scale=scale)
    subject = _describe(items[0])
    frames = [{"delta": float(d), "target_age": float(t), "latent_age": float(a), "reencoded_age": float(r),
               "latent_shift": float(s), "mean_abs_difference": float(diff.abs().mean())}
              for d, t, a, r, s, diff in zip(result["deltas"], result["target_age"], result["latent_age"],
                                             result["reencoded_age"], result["latent_shift"], result["differences"])]
    print(_text_table(["delta (y)", "target (y)", "age from z (y)", "age re-encoded (y)", "|dz| (spread units)"
                       if scale is not None else "|dz|", "mean |diff|"], [
        [f"{f['delta']:+.0f}", f"{f['target_age']:.1f}", f"{f['latent_age']:.1f}", f"{f['reencoded_age']:.1f}",
         f"{f['latent_shift']:.2f}", f"{f['mean_abs_difference']:.4f}"] for f in frames]))
    out = Path(args.out)
    png = counterfactual_grid(result["frames"].numpy(), result["differences"].numpy(), out / "counterfactual.png",
                              labels=[f"{f['delta']:+.0f} y -> {f['target_age']:.0f} y\nre-read {f['reencoded_age']:.0f} y"
                                      for f in frames],
                              title=f"{_label(subject)}: z_sem moved along the age head's direction "
                                    f"(model says {float(result['predicted_age']):.1f} y)")
    summary = {"ddim_steps": args.ddim_steps, "subject": subject, "latent_units": "spread" if scale is not None else "raw",
               "predicted_age": float(result["predicted_age"]), "frames": frames}
    print(f"wrote {png} and {write_json(out / 'counterfactual.json', summary)}")


def _model_options(parser) -> None:
    parser.add_argument("--config_file", "--config-file", type=cli.existing_file, default="configs/inference.yaml",
                        help="bundle config defining network_def, ckpt_path, device and slice_transforms")
    parser.add_argument("--ckpt_path", "--ckpt-path", default=None,
                        help="trained weights; None: the config's ckpt_path (models/model.pt)")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0; None: the config's device")
    parser.add_argument("--autocast-dtype", choices=AUTOCAST_CHOICES, default="none",
                        help="autocast dtype of the network passes; none = float32, safest for DDIM inversion")
    parser.add_argument("--ddim-steps", type=cli.positive_int, default=None,
                        help="DDIM steps each way, dividing 1000; None: the config's ddim_steps (50 if it has none)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=8, help="images per network pass")


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m scripts.analysis",
        description="Analyses of brain-age predictions and of the diffusion autoencoder (paper Tables 1-2, "
                    "Figures 2-4). Run from the bundle root.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pad_help = "brain-PAD column: raw, or corrected for age bias with the validation fit"
    pads = ("brain_pad", "brain_pad_corrected")

    p = sub.add_parser("metrics", help="accuracy (r, MAE, RMSE, R2) and PAD-age bias: metrics.json + scatter.png")
    p.add_argument("predictions", type=cli.existing_file, metavar="PRED.csv", help="predictions.csv from inference")
    p.add_argument("--bias-correction", default=None, metavar="JSON",
                   help="age-bias correction fitted on validation data, to report corrected-PAD statistics")
    p.add_argument("--out", default="eval/analysis", help="output folder")
    p.set_defaults(run=_run_metrics)

    p = sub.add_parser("association", help="Pearson r between brain-PAD and an outcome (Table 1, last row)")
    p.add_argument("predictions", type=cli.existing_file, metavar="PRED.csv", help="predictions.csv from inference")
    p.add_argument("--outcome", default="survival_months", help="outcome column (a datalist column in the CSV)")
    p.add_argument("--pad", choices=pads, default="brain_pad", help=pad_help)
    p.add_argument("--split", default=None, help="only rows of this datalist split, e.g. disease; None: all rows")
    p.add_argument("--out", default="eval/analysis", help="output folder for association.json")
    p.set_defaults(run=_run_association)

    p = sub.add_parser("ks", help="PAD mean/std per model and two-sample KS tests (Table 2) + box plot (Figure 2)")
    p.add_argument("predictions", type=cli.existing_file, nargs="+", metavar="PRED.csv",
                   help="one predictions.csv per model, on the same cohort")
    p.add_argument("--names", nargs="+", default=None,
                   help="model names, one per file; None: each file's folder name")
    p.add_argument("--reference", default=None, help="the model the others are tested against; None: the first")
    p.add_argument("--pad", choices=pads, default="brain_pad", help=pad_help)
    p.add_argument("--split", nargs="+", default=None,
                   help="only rows of this datalist split (e.g. disease), or one split per file; None: all rows")
    p.add_argument("--out", default="eval/analysis", help="output folder for pad_distributions.json and pad_boxplot.png")
    p.set_defaults(run=_run_ks)

    p = sub.add_parser("reconstruct", help="DDIM encode/decode round trips of slices (Figure 4)")
    p.add_argument("--input", nargs="+", required=True, metavar="DATALIST_or_NIfTI",
                   help="datalist JSON(s), model-input slice NIfTI file(s) or folders of them")
    p.add_argument("--split", default="test", help="datalist split to draw from")
    p.add_argument("--n", type=cli.positive_int, nargs="+", default=[4],
                   help="images per input (one count, or one per input), spread from the youngest to the oldest "
                        "labelled item of a datalist (one: the median age)")
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for reconstructions.png/.json")
    p.set_defaults(run=_run_reconstruct)

    p = sub.add_parser("interpolate", help="decode an interpolation between a young and an old brain (Figure 3)")
    p.add_argument("--young", type=cli.existing_file, default=None, help="model-input slice of the young brain")
    p.add_argument("--old", type=cli.existing_file, default=None, help="model-input slice of the old brain")
    p.add_argument("--datalist", default=None,
                   help="instead of --young/--old: the youngest and oldest labelled subjects of --split")
    p.add_argument("--split", default="test", help="datalist split for --datalist")
    p.add_argument("--frames", type=cli.positive_int, default=7, help="frames including both ends (>= 2)")
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for interpolation.png/.json")
    p.set_defaults(run=_run_interpolate)

    p = sub.add_parser("counterfactual", help="one brain decoded younger and older along the age direction")
    p.add_argument("--image", type=cli.existing_file, default=None, help="model-input slice of the subject")
    p.add_argument("--datalist", default=None, help="instead of --image: the median-age labelled subject of --split")
    p.add_argument("--split", default="test", help="datalist split for --datalist")
    p.add_argument("--deltas", type=float, nargs="+", default=[-20, -10, 0, 10, 20],
                   help="age changes in years, relative to the model's prediction for the image")
    p.add_argument("--reference", default=None,
                   help="with --image: a datalist whose --split images give the spread of z_sem that latent moves "
                        "are measured in (--datalist serves itself); None: raw latent units")
    p.add_argument("--reference-size", type=cli.positive_int, default=64,
                   help="images of the reference split used for the spread")
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for counterfactual.png/.json")
    p.set_defaults(run=_run_counterfactual)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "interpolate":
        if args.frames < 2:
            parser.error(f"argument --frames: must be >= 2, got {args.frames}")
        if bool(args.young) != bool(args.old) or bool(args.datalist) == bool(args.young):
            parser.error("give --young and --old images, or --datalist (its youngest and oldest labelled subjects)")
    if args.command == "counterfactual" and bool(args.image) == bool(args.datalist):
        parser.error("give --image, or --datalist (its median-age labelled subject)")
    try:
        if hasattr(args, "ddim_steps") and args.ddim_steps is None:
            args.ddim_steps = config_ddim_steps(args.config_file)
        args.run(args)
    except (FileNotFoundError, ValueError) as err:  # includes datalist and checkpoint problems: one line, exit 2
        parser.error(" ".join(str(err).split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
