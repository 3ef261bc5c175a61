"""Does the semantic latent carry the brain? Train through ``run training`` and measure what z_sem does.

Two parts, on the embedded phantom (docs/latent.md has the tables this writes):

* ``variants``: the latent designs tried, side by side, each trained ``--variant_epochs`` with the same data, seed
  and step budget: the between-subject spread of z relative to |z| at initialisation and after training, the
  wrong-z penalty at every validation (the relative rise in noise MSE at t = 300 when z is swapped between
  subjects), validation MAE, and how far bf16 autocast moves predicted ages on the test split.
* ``curve``: the bundle's default design trained for each of ``--epochs`` (a training-length curve), each model
  then put through the latent's own tests on the test split: generation from z alone (share of shared-noise
  decodes nearest their own subject; r of the decodes' ages), counterfactual ageing by +/-20 years (re-read age
  shift, against a random latent direction of the same length, and the correlation of the image change with
  the phantom's true ageing of that subject), interpolation (are re-read ages monotonic?), reconstructions
  with the swapped-z control. The longest run also draws the figures.

    .venv/bin/python tests/benchmarks/bench_latent.py --part variants curve      # both (about 2 h here)
    .venv/bin/python tests/benchmarks/bench_latent.py --part curve --epochs 8 --image_size 64
    .venv/bin/python tests/benchmarks/bench_latent.py --part last --figures docs/figures   # last-epoch EMA weights
    .venv/bin/python tests/benchmarks/bench_latent.py --help

Writes ``--json`` (default docs/benchmarks/latent.json; each part replaces its own key) and, with ``--figures``, the
latent figures of the longest curve run. Run it alone: wall-clock seconds are reported per run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the bundle root, which holds `scripts`

from monai.bundle import ConfigWorkflow  # noqa: E402

from scripts import cli  # noqa: E402
from scripts import generative, phantom  # noqa: E402
from scripts.data import embedded_phantom  # noqa: E402
from scripts.handlers import PreciseBatchNorm, wrong_latent_penalty  # noqa: E402
from scripts.inference import load_weights  # noqa: E402
from scripts.statistics import pearson_r  # noqa: E402

# The designs compared in `variants`: overrides of configs/train.yaml. "wave 1" is the bundle before this work.
OFF = {"use_ema": False, "grad_clip_norm": 0}
VARIANTS = {
    "wave 1: plain latent, BatchNorm head, bf16 encoder": {
        "latent_norm": "none",
        "head_norm": "batch",
        "encoder_fp32": False,
        **OFF,
    },
    "output gain x10": {"latent_norm": "none", "latent_gain": 10.0, "head_norm": "batch", "encoder_fp32": False, **OFF},
    "LayerNorm latent": {"latent_norm": "layer", "head_norm": "batch", "encoder_fp32": False, **OFF},
    "BatchNorm latent, BatchNorm head": {"latent_norm": "batch", "head_norm": "batch", "encoder_fp32": False, **OFF},
    "BatchNorm latent, plain head": {"latent_norm": "batch", "head_norm": "none", "encoder_fp32": False, **OFF},
    "+ float32 encoder": {"latent_norm": "batch", "head_norm": "none", "encoder_fp32": True, **OFF},
    "+ EMA and clipping (default)": {},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        choices=["variants", "curve", "last"],
        default=["variants", "curve"],
        help="last: the latent tests again on the EMA weights of the last epoch of each curve run "
        "(model.pt is the best validation epoch, often an early one)",
    )
    parser.add_argument("--image_size", type=int, default=64, help="network input side (default 64)")
    parser.add_argument("--variant_epochs", type=int, default=8, help="epochs per design in `variants`")
    parser.add_argument("--variants", nargs="+", default=None, help="names of VARIANTS to run (default: all)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[8, 16, 32], help="training lengths of `curve`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_dir", default=str(ROOT / "data" / "phantom"), help="embedded phantom folder")
    parser.add_argument("--out_dir", default=str(ROOT / "runs" / "bench_latent"), help="runs and checkpoints")
    parser.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "latent.json"), help="results file")
    parser.add_argument("--figures", default=None, help="folder for the longest curve run's figures (docs/figures)")
    parser.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps of the latent tests")
    parser.add_argument("--n_generate", type=int, default=32, help="test images decoded from z alone")
    parser.add_argument("--n_counterfactual", type=int, default=8, help="test subjects aged +/- 20 years")
    parser.add_argument("--n_interpolate", type=int, default=4, help="young/old test pairs interpolated")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ training


def train(run_dir: Path, datalist: str, image_size: int, max_epochs: int, seed: int, overrides: dict) -> dict:
    """``run training`` in this process; returns the per-validation history, the init statistics, time and steps."""
    settings = {
        "bundle_root": str(ROOT),
        "datalist": datalist,
        "output_dir": str(run_dir / "run"),
        "ckpt_path": str(run_dir / "model.pt"),
        "image_size": image_size,
        "max_epochs": max_epochs,
        "seed": seed,
        "device": "$torch.device('cpu')",
        **overrides,
    }
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "train.yaml"),
        workflow_type=None,
        run_id="training",
        logging_file=str(ROOT / "configs" / "logging.conf"),
        **settings,
    )
    workflow.initialize()
    parser = workflow.parser
    network = parser.get_parsed_content("network")
    train_loader = parser.get_parsed_content("train#batchnorm_loader")
    val_images = torch.cat([batch["image"] for batch in parser.get_parsed_content("validate#dataloader")]).as_tensor()
    init = copy.deepcopy(network)
    PreciseBatchNorm(init, train_loader)()  # what training computes before its first validation
    init_stats = {**generative.latent_statistics(init, val_images), **feature_statistics(init, val_images)}
    del init

    history = []
    evaluator, trainer = parser.get_parsed_content("validate#evaluator"), parser.get_parsed_content("train#trainer")
    from ignite.engine import Events

    evaluator.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda engine: history.append(
            {
                "epoch": trainer.state.epoch,
                "iteration": trainer.state.iteration,
                **{k: float(v) for k, v in engine.state.metrics.items()},
            }
        ),
    )
    start = time.perf_counter()
    workflow.run()
    seconds = time.perf_counter() - start
    steps = trainer.state.iteration
    workflow.finalize()
    return {
        "history": history,
        "init": init_stats,
        "train_seconds": round(seconds, 1),
        "steps": steps,
        "seconds_per_step": round(seconds / max(steps, 1), 3),
        "settings": dict(overrides),
    }


@torch.no_grad()
def feature_statistics(model, images: torch.Tensor) -> dict:
    """Spread of the encoder's output *before* its standardisation, relative to its size."""
    model.eval()
    features = torch.cat([model.encoder.features(chunk) for chunk in images.split(32)])
    return {"pre_norm_spread_ratio": float(features.std(0).mean() / features.abs().mean())}


def trained_model(run_dir: Path, image_size: int, overrides: dict, last: bool = False):
    """The best model written by training (or, with ``last``, the EMA weights at the end of the last epoch, from
    ``run/last.pt``), on the CPU in eval mode, and the slice transforms at this size."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.yaml"))
    parser.update(
        {
            "bundle_root": str(ROOT),
            "image_size": image_size,
            "device": "$torch.device('cpu')",
            **{k: v for k, v in overrides.items() if k not in ("use_ema", "grad_clip_norm")},
        }
    )
    network = parser.get_parsed_content("network_def")
    if last:  # the resume state's EMA weights (with the BatchNorm statistics of the last validation)
        state = torch.load(run_dir / "run" / "last.pt", map_location="cpu", weights_only=True)
        network.load_state_dict(state["ema"]["model"])
        network.eval()
    else:
        network = load_weights(network, run_dir / "model.pt").eval()
    return network, parser.get_parsed_content("preprocessing")


def load_split(datalist: str, split: str, transforms) -> tuple[list[dict], torch.Tensor]:
    items = json.loads(Path(datalist).read_text())[split]
    root = Path(datalist).parent
    images = [torch.as_tensor(transforms({"image": str(root / it["image"])})["image"]) for it in items]
    return items, torch.stack(images).float()


def by_age(items: list[dict], n: int) -> list[int]:
    """Indices of ``n`` items spread evenly from the youngest to the oldest."""
    order = sorted(range(len(items)), key=lambda i: float(items[i]["age"]))
    return [order[int(round(k))] for k in np.linspace(0, len(order) - 1, min(n, len(order)))]


# ------------------------------------------------------------------------------------------------ measurements


@torch.no_grad()
def precision_effect(model, images: torch.Tensor) -> dict:
    """Predicted ages under bf16 autocast against float32, on the same images."""
    full = torch.cat([model.predict_age(chunk) for chunk in images.split(32)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.cat([model.predict_age(chunk) for chunk in images.split(32)]).float()
    difference = (low - full).abs()
    return {"bf16_vs_fp32_mean_years": float(difference.mean()), "bf16_vs_fp32_max_years": float(difference.max())}


def phantom_subjects(dataset_dir: Path) -> dict:
    spec = phantom.CohortSpec(**json.loads((dataset_dir / "phantom.json").read_text())["spec"])
    return {subject.subject: subject for subject in phantom.sample_cohort(spec)}


def true_ageing(subject, start: float, end: float, image_size: int) -> np.ndarray:
    """The phantom's own ageing of this subject from ``start`` to ``end`` brain age, noise-free, at the model size."""
    frames = [phantom.render_slice(replace(subject, brain_age=float(age)), acquire=False) for age in (start, end)]
    difference = torch.from_numpy(frames[1] - frames[0])[None]
    return F.interpolate(difference, size=(image_size, image_size), mode="area")[0].numpy()


def latent_tests(model, datalist: str, transforms, dataset_dir: Path, args, figures: Path | None) -> dict:
    """The latent's own tests on the test split (docs/latent.md)."""
    from scripts import figures as plots

    items, images = load_split(datalist, "test", transforms)
    ages = torch.tensor([float(it["age"]) for it in items])
    with torch.no_grad():
        predicted = torch.cat([model.predict_age(chunk) for chunk in images.split(32)])
    report = {
        "test_mae": float((predicted - ages).abs().mean()),
        "test_r": pearson_r(predicted, ages),
        **generative.latent_statistics(model, images),
        **feature_statistics(model, images),
        **precision_effect(model, images),
    }
    from monai.networks.schedulers import DDPMScheduler

    report["wrong_z_penalty_t300"] = wrong_latent_penalty(model, images[:64], DDPMScheduler(1000), 300)["penalty"]

    chosen = by_age(items, args.n_generate)
    start = time.perf_counter()
    generation = generative.generate_from_latent(model, images[chosen], args.ddim_steps, batch_size=16)
    report["generation"] = {
        "n": len(chosen),
        "nearest_own_share": generation["nearest_own_share"],
        "chance_share": generation["chance_share"],
        "age_r": generation["age_r"],
        "seconds": round(time.perf_counter() - start, 1),
    }

    shown = by_age(items, 8)
    reconstruction = generative.reconstruct(model, images[shown], args.ddim_steps, batch_size=8)
    report["reconstruction"] = {
        "n": len(shown),
        "mse_own_z": float(reconstruction["mse"].mean()),
        "mse_swapped_z": float(reconstruction["swapped_mse"].mean()),
        "swap_penalty": float(reconstruction["swap_penalty"]),
        "median_swap_ratio": float(reconstruction["median_swap_ratio"]),
    }

    subjects = phantom_subjects(dataset_dir)
    scale = generative.latent_spread(model, images)
    rows = []
    for index in by_age(items, args.n_counterfactual):
        result = generative.counterfactual_ageing(
            model, images[index], (-20, 0, 20), args.ddim_steps, batch_size=8, latent_scale=scale, seed=index
        )
        reread, control = result["reencoded_age"], result["control_reencoded_age"]
        subject = subjects[items[index]["subject"]]
        truth = true_ageing(subject, subject.brain_age - 20, subject.brain_age + 20, images.shape[-1])
        change = (result["frames"][2] - result["frames"][0]).numpy()
        control_change = (result["control_frames"][2] - result["control_frames"][0]).numpy()
        mask = images[index].numpy() > 0.02
        rows.append(
            {
                "subject": items[index]["subject"],
                "age": float(items[index]["age"]),
                "predicted_age": float(result["predicted_age"]),
                "reread_shift_older": float(reread[2] - reread[1]),
                "reread_shift_younger": float(reread[0] - reread[1]),
                "control_shift_older": float(control[2] - control[1]),
                "control_shift_younger": float(control[0] - control[1]),
                "latent_shift": float(result["latent_shift"][2]),
                "change_vs_true_ageing_r": generative.map_correlation(change, truth, mask),
                "control_change_vs_true_ageing_r": generative.map_correlation(control_change, truth, mask),
                "mean_abs_change": float(np.abs(change).mean()),
                "control_mean_abs_change": float(np.abs(control_change).mean()),
            }
        )
        if figures is not None and len(rows) == (args.n_counterfactual + 1) // 2:  # a mid-age subject
            plots.counterfactual_grid(
                result["frames"].numpy(),
                result["differences"].numpy(),
                figures / "latent_counterfactual.png",
                labels=[f"{d:+d} y: re-read {float(r - reread[1]):+.1f} y" for d, r in zip((-20, 0, 20), reread)],
                control_frames=result["control_frames"].numpy(),
                control_differences=result["control_differences"].numpy(),
                control_labels=[f"re-read {float(c - control[1]):+.1f} y" for c in control],
                reference=truth,
                title=f"{items[index]['subject']} ({items[index]['age']:.0f} y): z moved along the age direction by "
                f"-20/0/+20 years; control: a random direction of the same length",
            )
    report["counterfactual"] = summarise_counterfactual(rows)

    pairs = []
    young_old = by_age(items, 2 * args.n_interpolate)
    for k in range(args.n_interpolate):
        young, old = young_old[k], young_old[-1 - k]
        result = generative.interpolate(model, images[young], images[old], n_frames=7, ddim_steps=args.ddim_steps)
        pairs.append(
            {
                "young": items[young]["subject"],
                "old": items[old]["subject"],
                "monotonic": result["monotonic"],
                "spearman": result["spearman"],
                "reencoded_age": [float(a) for a in result["reencoded_age"]],
                "control_reencoded_age": [float(a) for a in result["control_reencoded_age"]],
            }
        )
        if figures is not None and k == 0:
            plots.interpolation_grid(
                result["frames"].numpy(),
                result["predicted_age"].numpy(),
                figures / "latent_interpolation.png",
                reencoded_ages=result["reencoded_age"].numpy(),
                control_frames=result["control_frames"].numpy(),
                control_ages=result["control_reencoded_age"].numpy(),
                title=f"{items[young]['subject']} ({items[young]['age']:.0f} y) -> {items[old]['subject']} "
                f"({items[old]['age']:.0f} y); control row: x_T path with the young z",
            )
    report["interpolation"] = {
        "pairs": pairs,
        "monotonic_share": float(np.mean([p["monotonic"] for p in pairs])),
        "mean_spearman": float(np.nanmean([p["spearman"] for p in pairs])),
    }

    if figures is not None:
        labels = [f"{items[i]['subject']} ({items[i]['age']:.0f} y)" for i in shown]
        plots.reconstruction_grid(
            images[shown].numpy(),
            reconstruction["reconstructions"].numpy(),
            figures / "latent_reconstructions.png",
            labels=labels,
            swapped=reconstruction["swapped_reconstructions"].numpy(),
            title="DDIM reconstructions with each image's own z, and with the next image's z",
        )
        eight = chosen[:: max(1, len(chosen) // 8)][:8]
        sub = generative.generate_from_latent(model, images[eight], args.ddim_steps, batch_size=8)
        plots.generation_grid(
            images[eight].numpy(),
            sub["decodes"].numpy(),
            sub["nearest"].numpy(),
            figures / "latent_generation.png",
            labels=[f"{items[i]['subject']} ({items[i]['age']:.0f} y)" for i in eight],
            title="One shared x_T decoded with each subject's z_sem (nearest among these 8)",
        )
    return report


def summarise_counterfactual(rows: list[dict]) -> dict:
    older = np.array([r["reread_shift_older"] for r in rows])
    younger = np.array([r["reread_shift_younger"] for r in rows])
    return {
        "n": len(rows),
        "requested_years": 20,
        "mean_reread_shift_older": float(older.mean()),
        "mean_reread_shift_younger": float(younger.mean()),
        "share_moving_half_both_ways": float(np.mean((older >= 10) & (younger <= -10))),
        "mean_control_shift_older": float(np.mean([r["control_shift_older"] for r in rows])),
        "mean_control_shift_younger": float(np.mean([r["control_shift_younger"] for r in rows])),
        "mean_change_vs_true_ageing_r": float(np.nanmean([r["change_vs_true_ageing_r"] for r in rows])),
        "mean_control_change_vs_true_ageing_r": float(np.nanmean([r["control_change_vs_true_ageing_r"] for r in rows])),
        "subjects": rows,
    }


# ---------------------------------------------------------------------------------------------------------- main


def write_part(path: Path, key: str, value) -> None:
    from scripts.atomic import write_json

    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    write_json(path, data)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dataset_dir = Path(args.dataset_dir)
    datalist = embedded_phantom(dataset_dir)
    out = Path(args.out_dir)
    machine = {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_native": bool(torch.cpu._is_avx512_bf16_supported()),
    }
    common = {
        "image_size": args.image_size,
        "seed": args.seed,
        "datalist": "embedded phantom (600 + 120)",
        "machine": machine,
    }

    if "variants" in args.part:
        names = args.variants or list(VARIANTS)
        results = {}
        for name in names:
            overrides = VARIANTS[name]
            run_dir = out / "variants" / name.split(":")[0].replace(" ", "_").replace("+", "plus")
            print(f"== variant {name!r}: {args.variant_epochs} epochs", flush=True)
            run = train(run_dir, datalist, args.image_size, args.variant_epochs, args.seed, overrides)
            model, transforms = trained_model(run_dir, args.image_size, overrides)
            items, images = load_split(datalist, "test", transforms)
            with torch.no_grad():
                predicted = torch.cat([model.predict_age(chunk) for chunk in images.split(32)])
            ages = torch.tensor([float(it["age"]) for it in items])
            run["after"] = {
                **generative.latent_statistics(model, images),
                **feature_statistics(model, images),
                **precision_effect(model, images),
                "test_mae": float((predicted - ages).abs().mean()),
            }
            results[name] = run
            print(
                json.dumps(
                    {"variant": name, "init": run["init"], "after": run["after"], "history": run["history"]},
                    indent=None,
                ),
                flush=True,
            )
        write_part(Path(args.json), "variants", {**common, "epochs": args.variant_epochs, "results": results})

    if "curve" in args.part:
        results = []
        for epochs in sorted(args.epochs):
            run_dir = out / "curve" / f"epochs_{epochs}"
            print(f"== default design: {epochs} epochs", flush=True)
            run = train(run_dir, datalist, args.image_size, epochs, args.seed, {})
            model, transforms = trained_model(run_dir, args.image_size, {})
            figures = Path(args.figures) if args.figures and epochs == max(args.epochs) else None
            start = time.perf_counter()
            run["tests"] = latent_tests(model, datalist, transforms, dataset_dir, args, figures)
            run["tests"]["seconds"] = round(time.perf_counter() - start, 1)
            run["epochs"] = epochs
            results.append(run)
            print(
                json.dumps({k: v for k, v in run["tests"].items() if k not in ("counterfactual", "interpolation")}),
                json.dumps({k: v for k, v in run["tests"]["counterfactual"].items() if k != "subjects"}),
                json.dumps({k: v for k, v in run["tests"]["interpolation"].items() if k != "pairs"}),
                flush=True,
            )
            write_part(Path(args.json), "curve", {**common, "results": results})

    if "last" in args.part:
        data = json.loads(Path(args.json).read_text())
        for run in data["curve"]["results"]:
            if run["epochs"] not in args.epochs:
                continue
            run_dir = out / "curve" / f"epochs_{run['epochs']}"
            print(f"== last-epoch EMA weights of the {run['epochs']}-epoch run", flush=True)
            model, transforms = trained_model(run_dir, args.image_size, {}, last=True)
            figures = Path(args.figures) if args.figures and run["epochs"] == max(args.epochs) else None
            start = time.perf_counter()
            run["tests_last_epoch"] = latent_tests(model, datalist, transforms, dataset_dir, args, figures)
            run["tests_last_epoch"]["seconds"] = round(time.perf_counter() - start, 1)
            print(
                json.dumps(
                    {k: v for k, v in run["tests_last_epoch"].items() if k not in ("counterfactual", "interpolation")}
                ),
                json.dumps({k: v for k, v in run["tests_last_epoch"]["counterfactual"].items() if k != "subjects"}),
                json.dumps({k: v for k, v in run["tests_last_epoch"]["interpolation"].items() if k != "pairs"}),
                flush=True,
            )
            write_part(Path(args.json), "curve", data["curve"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
