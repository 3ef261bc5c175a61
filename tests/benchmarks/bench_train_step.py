"""Time the training iteration, the bare training step and age inference of the paper-size model on this machine,
next to its matmul peak, in one run; prints (and writes) JSON.

Bare step = DiffusionPrepareBatch + DiffusionAutoencoderInferer + SemiSupervisedLoss + backward + Adam step.
Trainer iteration (``--trainer``) = what a user waits for per iteration: MONAI's ``SupervisedTrainer`` built from
``configs/train.yaml`` with every handler the training run attaches (EMA, gradient clipping, loss terms, NaN guard,
TensorBoard, progress bar) on a small phantom, timed from one iteration's start to the next (the next batch's
loading included). ``--profile N`` also profiles N steps of each with ``torch.profiler`` and lists the ops that take
the most time, so the gap between the two is attributed. Inference = encoder + age head (``AgePredictor``) in eval
mode under ``torch.inference_mode``.

    .venv/bin/python tests/benchmarks/bench_train_step.py                 # fp32 and bf16, contiguous and NHWC
    .venv/bin/python tests/benchmarks/bench_train_step.py --dtypes bf16 --layouts channels_last --steps 10
    .venv/bin/python tests/benchmarks/bench_train_step.py --threads 1 --clock cpu   # on a shared, busy machine

Each setting also reports the FLOPs of one call (``torch.utils.flop_counter``: convolutions, matmuls, attention)
and the achieved GFLOP/s as a share of this machine's measured matmul peak (a large square matmul, fp32 and
bf16), and the run reports its peak resident memory. ``--out FILE.json`` keeps the report.

Other processes on the same cores distort wall-clock numbers badly (each op waits until all its threads are
scheduled); ``--threads 1 --clock cpu`` measures this process' CPU time instead, which holds up under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the bundle root, which holds `scripts`

from monai.networks.schedulers import DDPMScheduler  # noqa: E402

from scripts import cli  # noqa: E402
from scripts.atomic import write_json  # noqa: E402
from scripts.inferers import DiffusionAutoencoderInferer  # noqa: E402
from scripts.losses import SemiSupervisedLoss  # noqa: E402
from scripts.networks import DiffusionAutoencoder, count_parameters  # noqa: E402
from scripts.prepare_batch import DiffusionPrepareBatch  # noqa: E402

AUTOCAST = {"fp32": None, "bf16": "bfloat16"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8, help="training batch size (default: 8)")
    parser.add_argument("--image_size", type=int, default=128, help="slice side length (default: 128)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per setting (default: 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (oneDNN primitive creation)")
    parser.add_argument("--labelled_fraction", type=float, default=0.25, help="labelled share of each batch")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(AUTOCAST), default=["fp32", "bf16"])
    parser.add_argument(
        "--layouts", nargs="+", choices=["contiguous", "channels_last"], default=["contiguous", "channels_last"]
    )
    parser.add_argument("--infer_batches", type=int, nargs="*", default=[1, 64], help="inference batch sizes")
    parser.add_argument("--infer_repeats", type=int, default=20, help="timed inference calls at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--keep_denormals",
        action="store_true",
        help="do not flush denormals (slow: Adam's tiny second moments become denormal on CPU)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process' CPU time (use with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul_size", type=int, default=2048, help="side of the square matmul of the peak test")
    parser.add_argument("--trainer", action="store_true", help="also time the configured trainer's iterations")
    parser.add_argument("--trainer_iterations", type=int, default=16, help="timed trainer iterations (after 3)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps of the trainer and bare step")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    return parser.parse_args(argv)


def clock(args: argparse.Namespace) -> float:
    return time.process_time() if args.clock == "cpu" else time.perf_counter()


def matmul_peak(args: argparse.Namespace) -> dict:
    """GFLOP/s of a large square matmul in fp32 and bf16: the machine's practical compute ceiling."""
    n = args.matmul_size
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(5):
            start = clock(args)
            a @ b
            times.append(clock(args) - start)
        peaks[name] = round(2 * n**3 / min(times) / 1e9, 1)
    return peaks


def count_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def peak_memory_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # kB on Linux


def make_batch(args: argparse.Namespace, layout: str) -> dict[str, torch.Tensor]:
    images = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    ages = torch.full((args.batch_size,), float("nan"))
    n_labelled = max(2, round(args.labelled_fraction * args.batch_size))
    ages[:n_labelled] = torch.linspace(30.0, 80.0, n_labelled)
    return {"image": images, "age": ages}


def time_training(args: argparse.Namespace, dtype: str, layout: str) -> dict:
    torch.manual_seed(args.seed)
    model = DiffusionAutoencoder(image_size=args.image_size).train()
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    prepare_batch = DiffusionPrepareBatch()
    inferer = DiffusionAutoencoderInferer(DDPMScheduler(1000), autocast_dtype=AUTOCAST[dtype])
    loss_function = SemiSupervisedLoss(model.age_head, lambda_age=1.0)
    batch = make_batch(args, layout)

    def step() -> float:
        start = clock(args)
        inputs, targets, inferer_args, inferer_kwargs = prepare_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(inferer(inputs, model, *inferer_args, **inferer_kwargs), targets)
        loss.backward()
        optimizer.step()
        return clock(args) - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    median = statistics.median(times)
    flops = count_flops(step)
    return {
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_gflop_per_s": round(flops / median / 1e9, 1),
        "dtype": dtype,
        "layout": layout,
        "batch_size": args.batch_size,
        "median_s_per_step": round(median, 4),
        "min_s_per_step": round(min(times), 4),
        "samples_per_s": round(args.batch_size / median, 2),
    }


def top_ops(profiler, n: int = 15) -> list[dict]:
    """The ops with the most self CPU time in a profile: name, total ms, calls."""
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in events[:n]]


def time_trainer(args: argparse.Namespace) -> dict:
    """Iterations of the SupervisedTrainer configs/train.yaml builds, with its handlers, on a phantom of 300 people."""
    import tempfile

    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from scripts import phantom

    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        spec = phantom.CohortSpec(n=300, seed=0, n_disease=0, n_calibration=0)
        datalist = phantom.ensure_dataset(Path(tmp) / "phantom", spec, workers=2)
        workflow = ConfigWorkflow(
            config_file=str(root / "configs" / "train.yaml"),
            meta_file=str(root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            run_id="training",
            bundle_root=str(root),
            datalist=datalist,
            output_dir=str(Path(tmp) / "run"),
            ckpt_path=str(Path(tmp) / "model.pt"),
            image_size=args.image_size,
            batch_size=args.batch_size,
            max_epochs=1,
            val_interval=1000,  # no validation: iterations only
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        # iterations 1-3 warm up, the next ones are timed (start to next start), then --profile ones are profiled
        stamps: list[float] = []
        timed_end = 3 + args.trainer_iterations + 1
        total = timed_end + args.profile
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: stamps.append(clock(args)))
        trainer.add_event_handler(Events.ITERATION_STARTED(once=total + 1), lambda engine: engine.terminate())
        profile = None
        if args.profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            profiler = torch_profile(activities=[ProfilerActivity.CPU])
            trainer.add_event_handler(Events.ITERATION_STARTED(once=timed_end), lambda engine: profiler.__enter__())
            trainer.add_event_handler(
                Events.ITERATION_STARTED(once=total), lambda engine: profiler.__exit__(None, None, None)
            )
        workflow.run()
        if args.profile:
            profile = top_ops(profiler)
    times = [b - a for a, b in zip(stamps[3 : timed_end - 1], stamps[4:timed_end])]
    median = statistics.median(times)
    result = {
        "batch_size": args.batch_size,
        "autocast": workflow.parser.get_parsed_content("autocast"),
        "iterations_timed": len(times),
        "median_s_per_iteration": round(median, 4),
        "min_s_per_iteration": round(min(times), 4),
        "samples_per_s": round(args.batch_size / median, 2),
    }
    if profile is not None:
        result["profile_top_ops"] = profile
    return result


def profile_bare_step(args: argparse.Namespace, dtype: str) -> list[dict]:
    """``top_ops`` of ``args.profile`` bare training steps (contiguous layout)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(args.seed)
    model = DiffusionAutoencoder(image_size=args.image_size).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    prepare_batch, loss_function = DiffusionPrepareBatch(), SemiSupervisedLoss(model.age_head, lambda_age=1.0)
    inferer = DiffusionAutoencoderInferer(DDPMScheduler(1000), autocast_dtype=AUTOCAST[dtype])
    batch = make_batch(args, "contiguous")

    def step() -> None:
        inputs, targets, inferer_args, inferer_kwargs = prepare_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        loss_function(inferer(inputs, model, *inferer_args, **inferer_kwargs), targets).backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.profile):
            step()
    return top_ops(profiler)


def time_inference(args: argparse.Namespace, dtype: str, layout: str, batch_size: int) -> dict:
    torch.manual_seed(args.seed)
    model = DiffusionAutoencoder(image_size=args.image_size).eval()
    predictor = model.age_predictor()
    images = torch.rand(batch_size, 1, args.image_size, args.image_size)
    if layout == "channels_last":
        predictor = predictor.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    repeats = max(3, args.infer_repeats // batch_size)
    with torch.inference_mode(), autocast:
        for _ in range(2):
            predictor(images)
        times = []
        for _ in range(repeats):
            start = clock(args)
            predictor(images)
            times.append(clock(args) - start)
    median = statistics.median(times)
    with torch.inference_mode(), autocast:
        flops = count_flops(lambda: predictor(images))
    return {
        "gflop_per_image": round(flops / batch_size / 1e9, 3),
        "achieved_gflop_per_s": round(flops / median / 1e9, 1),
        "dtype": dtype,
        "layout": layout,
        "batch_size": batch_size,
        "median_ms_per_call": round(1e3 * median, 3),
        "ms_per_image": round(1e3 * median / batch_size, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.keep_denormals)
    settings = [(dtype, layout) for dtype in args.dtypes for layout in args.layouts]
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "flush_denormal": not args.keep_denormals,
            "clock": args.clock,
            "load_average_1min": os.getloadavg()[0],
        },
        "parameters": count_parameters(DiffusionAutoencoder(image_size=args.image_size)),
        "image_size": args.image_size,
        "train_step": [time_training(args, dtype, layout) for dtype, layout in settings],
        "age_inference": [
            time_inference(args, dtype, layout, batch_size)
            for dtype, layout in settings
            for batch_size in args.infer_batches
        ],
    }
    if args.trainer:
        report["trainer_iteration"] = time_trainer(args)
        if args.profile:
            report["bare_step_profile_top_ops"] = profile_bare_step(args, args.dtypes[-1])
    report["matmul_peak_gflop_per_s"] = peaks = matmul_peak(args)
    for entry in report["train_step"] + report["age_inference"]:
        entry["share_of_matmul_peak"] = round(entry["achieved_gflop_per_s"] / peaks[entry["dtype"]], 3)
    report["peak_memory_mib"] = peak_memory_mib()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
