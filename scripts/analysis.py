"""Command line of the paper's analyses: ``python -m scripts.analysis {metrics, association, ks, reliability,
reconstruct, generate, interpolate, counterfactual}``.

The statistics live in :mod:`scripts.statistics`, the generative analyses (with their controls) in
:mod:`scripts.generative`; this module loads models and data for them, prints tables and writes JSON and figures.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts import cli
from scripts.atomic import write_json
from scripts.data import is_labelled, subject_from_path
from scripts.figures import (
    bland_altman_plot,
    counterfactual_grid,
    generation_grid,
    interpolation_grid,
    reconstruction_grid,
)
from scripts.generative import counterfactual_ageing, generate_from_latent, interpolate, latent_spread, reconstruct
from scripts.inference import load_weights, read_predictions, resolve_inputs
from scripts.precision import resolve_autocast_dtype
from scripts.slices import centre_level, is_model_input
from scripts.statistics import (
    _number,
    _text_table,
    compare_pad_distributions,
    evaluate_predictions,
    format_association,
    format_pad_table,
    pad_outcome_association,
    reliability,
)

# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m scripts.analysis {metrics, association, ks, reconstruct, interpolate, counterfactual}
# ---------------------------------------------------------------------------------------------------------------

AUTOCAST_CHOICES = ("float32", "bfloat16", "float16", "auto")  # the configs' autocast_dtype


def load_model(config_file: str | Path, ckpt_path: str | Path | None = None, device: str | None = None):
    """The network a bundle config defines, with trained weights, in eval mode; and the config's slice transforms.

    Defaults (checkpoint, device) are the config's, so the analyses see the model exactly as inference does.
    """

    parser = ConfigParser()
    parser.read_config(str(config_file))
    if device is not None:
        parser["device"] = f"$torch.device({device!r})"
    network = parser.get_parsed_content("network_def")
    load_weights(network, ckpt_path or parser.get_parsed_content("ckpt_path"))
    network.to(parser.get_parsed_content("device")).eval()
    return network, parser.get_parsed_content("preprocessing")


def config_ddim_steps(config_file: str | Path, default: int = 50) -> int:
    """The ``ddim_steps`` key of a bundle config (``configs/inference.yaml``: 50), or ``default``."""

    parser = ConfigParser()
    parser.read_config(str(config_file))
    return int(parser.get_parsed_content("ddim_steps")) if "ddim_steps" in parser else default


def _load_slices(items: list[dict], transforms) -> torch.Tensor:
    """Model-input slices as one float32 (N, C, H, W) batch, through the config's own slice transforms (the
    medial level of a multi-level file)."""
    images = []
    for item in items:
        path = item["image"]
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if not is_model_input(path):
            raise ValueError(
                f"{path}: not a 128x128 MNI model-input slice; preprocess raw scans first "
                "(python -m monai.bundle run preprocess --config_file configs/preprocess.yaml ...)"
            )
        image = torch.as_tensor(transforms({"image": path})["image"], dtype=torch.float32)
        images.append(centre_level(image[None])[0])  # the medial level
    return torch.stack(images)


def _spread_by_age(items: list[dict], n: int) -> list[dict]:
    """``n`` items evenly spread from the youngest to the oldest labelled one (n = 1: the median age); the first
    ``n`` when fewer are labelled."""

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


def _autocast_arg(args, model: torch.nn.Module) -> str | None:
    return resolve_autocast_dtype(args.autocast_dtype, next(model.parameters()).device)


def _prepare(args, items: list[dict]) -> tuple[torch.nn.Module, torch.Tensor, str | None]:
    """The first step of every generative command: the model, the items' medial slices, the autocast dtype."""
    model, transforms = load_model(args.config_file, args.ckpt_path, args.device)
    return model, _load_slices(items, transforms), _autocast_arg(args, model)


def _report(out: Path, name: str, summary: dict, table: str, figure: Callable[[Path], Path]) -> None:
    """The last step of every generative command: its table on stdout, ``OUT/<name>.png`` drawn by ``figure``
    and ``OUT/<name>.json``."""
    print(table)
    png = figure(out / f"{name}.png")
    print(f"wrote {png} and {write_json(out / f'{name}.json', summary)}")


def _run_metrics(args) -> None:
    if args.bias_correction and not Path(args.bias_correction).is_file():
        raise FileNotFoundError(f"{args.bias_correction}: no such bias-correction file")
    evaluate_predictions(args.predictions, args.out, args.bias_correction)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'scatter.png'}")


def _run_association(args) -> None:
    result = pad_outcome_association(read_predictions(args.predictions), args.outcome, args.pad, args.split)
    print(format_association(result))
    print(f"wrote {write_json(Path(args.out) / 'association.json', {**result, 'predictions': args.predictions})}")


def _run_ks(args) -> None:

    names = args.names or [Path(path).parent.name or Path(path).stem for path in args.predictions]
    if len(names) != len(args.predictions):
        raise ValueError(f"--names gives {len(names)} names for {len(args.predictions)} predictions files")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {', '.join(names)}; set them with --names")
    splits = args.split or [None]
    if len(splits) not in (1, len(names)):
        raise ValueError(
            f"--split gives {len(splits)} splits for {len(names)} predictions files; give one or one per file"
        )
    split = splits[0] if len(splits) == 1 else dict(zip(names, splits))
    named_rows = {name: read_predictions(path) for name, path in zip(names, args.predictions)}
    out = Path(args.out)
    result = compare_pad_distributions(named_rows, args.reference, args.pad, split, out / "pad_boxplot.png")
    result["predictions"] = dict(zip(names, args.predictions))
    print(format_pad_table(result))
    print(f"wrote {write_json(out / 'pad_distributions.json', result)} and {out / 'pad_boxplot.png'}")


def _cohort(args, default_n: int | None = None) -> list[dict]:
    if len(args.n) not in (1, len(args.input)):
        raise ValueError(f"--n gives {len(args.n)} counts for {len(args.input)} inputs; give one or one per input")
    counts = args.n * len(args.input) if len(args.n) == 1 else args.n
    return [
        item
        for source, n in zip(args.input, counts)
        for item in _spread_by_age(resolve_inputs(source, [args.split]), n)
    ]


def _run_reconstruct(args) -> None:

    items = _cohort(args)
    model, images, autocast = _prepare(args, items)
    print(f"reconstructing {len(items)} images ({args.ddim_steps} DDIM steps each way), with the swapped-z control...")
    result = reconstruct(model, images, args.ddim_steps, args.batch_size, autocast)
    swapped = "swapped_mse" in result
    described = [
        {
            **_describe(item),
            "mse": float(result["mse"][i]),
            "mae": float(result["mae"][i]),
            **(
                {
                    "swapped_mse": float(result["swapped_mse"][i]),
                    "swapped_z_from": items[(i + 1) % len(items)].get("subject", ""),
                }
                if swapped
                else {}
            ),
        }
        for i, item in enumerate(items)
    ]
    header = ["subject", "age", "grade", "MSE own z", "MAE own z"] + (["MSE next z"] if swapped else [])
    table = _text_table(
        header,
        [
            [d["subject"], _number(d["age"], ".1f"), d["grade"] or "-", f"{d['mse']:.2e}", f"{d['mae']:.4f}"]
            + ([f"{d['swapped_mse']:.2e}"] if swapped else [])
            for d in described
        ],
    )
    summary = {
        "ddim_steps": args.ddim_steps,
        "checkpoint": str(args.ckpt_path or "config default"),
        "mean_mse": float(result["mse"].mean()),
        "mean_mae": float(result["mae"].mean()),
        "images": described,
    }
    if swapped:
        summary.update(mean_swapped_mse=float(result["swapped_mse"].mean()), swap_penalty=float(result["swap_penalty"]))
        table += (
            f"\nswapped-z control: MSE {summary['mean_swapped_mse']:.2e} against {summary['mean_mse']:.2e} with the "
            f"own z ({100 * summary['swap_penalty']:+.0f} %; about 0 when the decoder ignores z)"
        )
    _report(
        Path(args.out),
        "reconstructions",
        summary,
        table,
        lambda png: reconstruction_grid(
            images.numpy(),
            result["reconstructions"].numpy(),
            png,
            labels=[_label(d) for d in described],
            swapped=result["swapped_reconstructions"].numpy() if swapped else None,
            title=f"DDIM reconstructions ({args.ddim_steps} steps, deterministic encoding of x_end), "
            "with each image's x_end decoded with the next image's z as control",
        ),
    )


def _run_generate(args) -> None:
    items = _cohort(args)
    if len(items) < 2:
        raise ValueError("generation from z needs at least 2 images; raise --n")
    model, images, autocast = _prepare(args, items)
    print(f"decoding one shared x_end with the z of {len(items)} images ({args.ddim_steps} DDIM steps)...")
    result = generate_from_latent(model, images, args.ddim_steps, args.batch_size, autocast, args.seed)
    described = [
        {
            **_describe(item),
            "nearest": items[int(result["nearest"][i])].get("subject", ""),
            "distance_own": float(result["distances"][i, i]),
            "predicted_age": float(result["predicted_age"][i]),
            "decoded_age": float(result["decoded_age"][i]),
        }
        for i, item in enumerate(items)
    ]
    table = _text_table(
        ["subject", "nearest original", "RMS to own", "age (original)", "age (decode)"],
        [
            [
                d["subject"],
                d["nearest"],
                f"{d['distance_own']:.4f}",
                f"{d['predicted_age']:.1f}",
                f"{d['decoded_age']:.1f}",
            ]
            for d in described
        ],
    )
    summary = {
        "ddim_steps": args.ddim_steps,
        "seed": args.seed,
        "nearest_own_share": result["nearest_own_share"],
        "chance_share": result["chance_share"],
        "age_r": result["age_r"],
        "images": described,
    }
    table += (
        f"\ndecodes nearest their own subject: {100 * result['nearest_own_share']:.0f} % (chance "
        f"{100 * result['chance_share']:.0f} %); r(decoded age, original's predicted age) = {_number(result['age_r'], '.2f')}"
    )
    _report(
        Path(args.out),
        "generation",
        summary,
        table,
        lambda png: generation_grid(
            images.numpy(),
            result["decodes"].numpy(),
            result["nearest"].numpy(),
            png,
            labels=[_label(d) for d in described],
            title=f"One shared x_end decoded with each subject's z_sem: {100 * result['nearest_own_share']:.0f} % "
            f"nearest their own subject (chance {100 * result['chance_share']:.0f} %)",
        ),
    )


def _run_interpolate(args) -> None:

    if args.datalist:
        ends = _spread_by_age(resolve_inputs(args.datalist, [args.split]), 2)
        if len(ends) < 2 or any(_describe(item)["age"] is None for item in ends):
            raise ValueError(f"{args.datalist}: split {args.split!r} needs at least two labelled items")
    else:
        ends = [{"image": path, "subject": subject_from_path(path)} for path in (args.young, args.old)]
    model, images, autocast = _prepare(args, ends)
    print(f"interpolating {args.frames} frames ({args.ddim_steps} DDIM steps each way), with the x_end-only control...")
    result = interpolate(model, images[0], images[1], args.frames, args.ddim_steps, args.batch_size, autocast)
    young, old = (_describe(item) for item in ends)
    frames = [
        {"weight": float(w), "predicted_age": float(a), "reencoded_age": float(r), "control_reencoded_age": float(c)}
        for w, a, r, c in zip(
            result["weights"], result["predicted_age"], result["reencoded_age"], result["control_reencoded_age"]
        )
    ]
    table = _text_table(
        ["weight", "age from z (y)", "age re-encoded (y)", "control: x_end only (y)"],
        [
            [
                f"{f['weight']:.2f}",
                f"{f['predicted_age']:.1f}",
                f"{f['reencoded_age']:.1f}",
                f"{f['control_reencoded_age']:.1f}",
            ]
            for f in frames
        ],
    )
    table += (
        f"\nre-encoded ages {'rise monotonically' if result['monotonic'] else 'do not rise monotonically'} "
        f"(Spearman {_number(result['spearman'], '.2f')})"
    )
    summary = {
        "ddim_steps": args.ddim_steps,
        "young": young,
        "old": old,
        "monotonic": result["monotonic"],
        "spearman": result["spearman"],
        "frames": frames,
    }
    _report(
        Path(args.out),
        "interpolation",
        summary,
        table,
        lambda png: interpolation_grid(
            result["frames"].numpy(),
            result["predicted_age"].numpy(),
            png,
            reencoded_ages=result["reencoded_age"].numpy(),
            control_frames=result["control_frames"].numpy(),
            control_ages=result["control_reencoded_age"].numpy(),
            title=f"{_label(young)} -> {_label(old)}: z_sem linear, x_end spherical interpolation",
        ),
    )


def _run_counterfactual(args) -> None:
    cohort = resolve_inputs(args.datalist or args.reference, [args.split]) if (args.datalist or args.reference) else []
    if args.datalist:
        items = _spread_by_age(cohort, 1)
        if not items:
            raise ValueError(f"{args.datalist}: no items in split {args.split!r}")
    else:
        items = [{"image": args.image, "subject": subject_from_path(args.image)}]
    reference = [cohort[int(i)] for i in np.linspace(0, len(cohort) - 1, min(len(cohort), args.reference_size))]
    model, images, autocast = _prepare(args, items + reference)  # the image first, then its reference cohort
    image = images[0]
    scale = None
    if reference:
        scale = latent_spread(model, images[1:], args.batch_size, autocast)
        print(f"latent moves in units of the spread of z_sem over {len(reference)} {args.split} images")
    print(
        f"decoding {len(args.deltas)} counterfactual ages ({args.ddim_steps} DDIM steps each way), with a "
        "random-direction control..."
    )
    result = counterfactual_ageing(
        model, image, args.deltas, args.ddim_steps, args.batch_size, autocast, latent_scale=scale, seed=args.seed
    )
    subject = _describe(items[0])
    zero = float(result["reencoded_age"][result["deltas"].abs().argmin()])
    control_zero = float(result["control_reencoded_age"][result["deltas"].abs().argmin()])
    frames = [
        {
            "delta": float(d),
            "target_age": float(t),
            "latent_age": float(a),
            "reencoded_age": float(r),
            "reread_shift": float(r) - zero,
            "latent_shift": float(s),
            "mean_abs_difference": float(diff.abs().mean()),
            "control_reencoded_age": float(c),
            "control_reread_shift": float(c) - control_zero,
            "control_mean_abs_difference": float(cdiff.abs().mean()),
        }
        for d, t, a, r, s, diff, c, cdiff in zip(
            result["deltas"],
            result["target_age"],
            result["latent_age"],
            result["reencoded_age"],
            result["latent_shift"],
            result["differences"],
            result["control_reencoded_age"],
            result["control_differences"],
        )
    ]
    table = _text_table(
        [
            "delta (y)",
            "target (y)",
            "age from z (y)",
            "re-read shift (y)",
            "|dz| (spread units)" if scale is not None else "|dz|",
            "mean |diff|",
            "control shift (y)",
        ],
        [
            [
                f"{f['delta']:+.0f}",
                f"{f['target_age']:.1f}",
                f"{f['latent_age']:.1f}",
                f"{f['reread_shift']:+.1f}",
                f"{f['latent_shift']:.2f}",
                f"{f['mean_abs_difference']:.4f}",
                f"{f['control_reread_shift']:+.1f}",
            ]
            for f in frames
        ],
    )
    summary = {
        "ddim_steps": args.ddim_steps,
        "subject": subject,
        "latent_units": "spread" if scale is not None else "raw",
        "predicted_age": float(result["predicted_age"]),
        "frames": frames,
    }
    _report(
        Path(args.out),
        "counterfactual",
        summary,
        table,
        lambda png: counterfactual_grid(
            result["frames"].numpy(),
            result["differences"].numpy(),
            png,
            labels=[
                f"{f['delta']:+.0f} y -> {f['target_age']:.0f} y\nre-read {f['reread_shift']:+.1f} y" for f in frames
            ],
            control_frames=result["control_frames"].numpy(),
            control_differences=result["control_differences"].numpy(),
            control_labels=[f"re-read {f['control_reread_shift']:+.1f} y" for f in frames],
            title=f"{_label(subject)}: z_sem moved along the age head's direction "
            f"(model says {float(result['predicted_age']):.1f} y); control: a random direction of the same length",
        ),
    )


def _run_reliability(args) -> None:

    result = reliability(args.first, args.second, args.column)
    out = Path(args.out)
    pairs = np.asarray(result["pairs"])
    png = bland_altman_plot(pairs[:, 0], pairs[:, 1], out / "bland_altman.png", result, labels=tuple(args.names))
    rows = [
        ["ICC(2,1) absolute agreement", _number(result["icc_2_1"], ".3f")],
        ["ICC(3,1) consistency", _number(result["icc_3_1"], ".3f")],
        [f"bias ({args.names[1]} - {args.names[0]}, years)", _number(result["bias"])],
        ["95 % limits of agreement (years)", f"{result['loa_lower']:.2f} to {result['loa_upper']:.2f}"],
        ["subjects", str(result["n"])],
    ]
    print(_text_table(["test-retest", args.column], rows))
    print(f"wrote {write_json(out / 'reliability.json', result)} and {png}")


def _input_option(p) -> None:
    """The images a generative command draws from: datalists, slice files or folders."""
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="DATALIST_or_NIfTI",
        help="datalist JSON(s), model-input slice NIfTI file(s) or folders of them",
    )


def _model_options(parser) -> None:
    parser.add_argument(
        "--config_file",
        type=cli.existing_file,
        default="configs/inference.yaml",
        help="bundle config defining network_def, ckpt_path, device and preprocessing (configs/inference.yaml)",
    )
    parser.add_argument(
        "--ckpt_path", default=None, help="trained weights; None: the config's ckpt_path (models/model.pt)"
    )
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0; None: the config's device")
    parser.add_argument(
        "--autocast_dtype",
        choices=AUTOCAST_CHOICES,
        default="float32",
        help="autocast dtype of the network passes, as the configs' autocast_dtype; float32 is safest for DDIM "
        "inversion",
    )
    parser.add_argument(
        "--ddim_steps",
        type=cli.positive_int,
        default=None,
        help="DDIM steps each way, dividing 1000; None: the config's ddim_steps (50 if it has none)",
    )
    parser.add_argument("--batch_size", type=cli.positive_int, default=8, help="images per network pass")


def build_parser():
    parser = cli.ArgumentParser(
        prog="python -m scripts.analysis",
        description="Analyses of brain-age predictions and of the diffusion autoencoder (paper Tables 1-2, "
        "Figures 2-4). Run from the bundle root.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pad_help = "brain-PAD column: raw, or corrected for age bias with the validation fit"
    pads = ("brain_pad", "brain_pad_corrected")

    p = sub.add_parser("metrics", help="accuracy (r, MAE, RMSE, R2) and PAD-age bias: metrics.json + scatter.png")
    p.add_argument("predictions", type=cli.existing_file, metavar="PRED.csv", help="predictions.csv from inference")
    p.add_argument(
        "--bias_correction",
        default=None,
        metavar="JSON",
        help="age-bias correction fitted on validation data, to report corrected-PAD statistics",
    )
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
    p.add_argument(
        "predictions",
        type=cli.existing_file,
        nargs="+",
        metavar="PRED.csv",
        help="one predictions.csv per model, on the same cohort",
    )
    p.add_argument("--names", nargs="+", default=None, help="model names, one per file; None: each file's folder name")
    p.add_argument("--reference", default=None, help="the model the others are tested against; None: the first")
    p.add_argument("--pad", choices=pads, default="brain_pad", help=pad_help)
    p.add_argument(
        "--split",
        nargs="+",
        default=None,
        help="only rows of this datalist split (e.g. disease), or one split per file; None: all rows",
    )
    p.add_argument(
        "--out", default="eval/analysis", help="output folder for pad_distributions.json and pad_boxplot.png"
    )
    p.set_defaults(run=_run_ks)

    p = sub.add_parser(
        "reliability", help="test-retest ICC(2,1), ICC(3,1) and Bland-Altman between two predictions.csv + plot"
    )
    p.add_argument("first", type=cli.existing_file, metavar="FIRST.csv", help="predictions of the first scans")
    p.add_argument("second", type=cli.existing_file, metavar="SECOND.csv", help="predictions of the re-scans")
    p.add_argument("--column", default="predicted_age", help="the measurement compared (default: %(default)s)")
    p.add_argument("--names", nargs=2, default=("first", "second"), help="labels of the two sessions")
    p.add_argument("--out", default="eval/analysis", help="output folder for reliability.json and bland_altman.png")
    p.set_defaults(run=_run_reliability)

    p = sub.add_parser("reconstruct", help="DDIM encode/decode round trips of slices (Figure 4), swapped-z control")
    _input_option(p)
    p.add_argument("--split", default="test", help="datalist split to draw from")
    p.add_argument(
        "--n",
        type=cli.positive_int,
        nargs="+",
        default=[4],
        help="images per input (one count, or one per input), spread from the youngest to the oldest "
        "labelled item of a datalist (one: the median age)",
    )
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for reconstructions.png/.json")
    p.set_defaults(run=_run_reconstruct)

    p = sub.add_parser("generate", help="decode one shared random x_end with each image's z_sem: what z alone carries")
    _input_option(p)
    p.add_argument("--split", default="test", help="datalist split to draw from")
    p.add_argument(
        "--n",
        type=cli.positive_int,
        nargs="+",
        default=[8],
        help="images per input (one count, or one per input), spread over the labelled ages",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shared x_end")
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for generation.png/.json")
    p.set_defaults(run=_run_generate)

    p = sub.add_parser(
        "interpolate", help="decode an interpolation between a young and an old brain (Figure 3), x_end-only control"
    )
    p.add_argument("--young", type=cli.existing_file, default=None, help="model-input slice of the young brain")
    p.add_argument("--old", type=cli.existing_file, default=None, help="model-input slice of the old brain")
    p.add_argument(
        "--datalist",
        default=None,
        help="instead of --young/--old: the youngest and oldest labelled subjects of --split",
    )
    p.add_argument("--split", default="test", help="datalist split for --datalist")
    p.add_argument("--frames", type=cli.positive_int, default=7, help="frames including both ends (>= 2)")
    _model_options(p)
    p.add_argument("--out", default="eval/analysis", help="output folder for interpolation.png/.json")
    p.set_defaults(run=_run_interpolate)

    p = sub.add_parser(
        "counterfactual",
        help="one brain decoded younger and older along the age direction, " "random-direction control",
    )
    p.add_argument("--image", type=cli.existing_file, default=None, help="model-input slice of the subject")
    p.add_argument("--datalist", default=None, help="instead of --image: the median-age labelled subject of --split")
    p.add_argument("--split", default="test", help="datalist split for --datalist")
    p.add_argument(
        "--deltas",
        type=float,
        nargs="+",
        default=[-20, -10, 0, 10, 20],
        help="age changes in years, relative to the model's prediction for the image",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="with --image: a datalist whose --split images give the spread of z_sem that latent moves "
        "are measured in (--datalist serves itself); None: raw latent units",
    )
    p.add_argument(
        "--reference_size", type=cli.positive_int, default=64, help="images of the reference split used for the spread"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the control's random latent direction")
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
