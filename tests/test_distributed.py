"""Multi-process training with the configs/multi_gpu_train.yaml overlay: torchrun, 2 processes, CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from scripts.data import is_labelled
from scripts.samplers import LabelledRatioBatchSampler


def test_torchrun_ddp_training_on_cpu_writes_from_rank_0_only(bundle_root, slice_dataset, tiny_network, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "models" / "model.pt"
    overrides = {
        "datalist": str(slice_dataset / "datalist.json"),
        "output_dir": str(out),
        "ckpt_path": str(ckpt),
        "max_epochs": 2,
        "batch_size": 4,
        "val_batch_size": 8,
        "autocast_dtype": None,
        **tiny_network,
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.yaml','configs/multi_gpu_train.yaml']",
    ]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # rank 0 wrote the best model, its bias correction fitted on the validation shards of both ranks, and the
    # resumable state; the other rank wrote nothing
    assert ckpt.is_file() and (tmp_path / "models" / "model_bias_correction.json").is_file()
    validation = json.loads((slice_dataset / "datalist.json").read_text())["validation"]
    fitted_on = json.loads((tmp_path / "models" / "model_bias_correction.json").read_text())["n"]
    assert len(validation) <= fitted_on <= len(validation) + 1  # even_divisible pads at most one item per rank
    state = torch.load(out / "last.pt", weights_only=True)
    # each rank ran its own half of the sampler's batches
    training = json.loads((slice_dataset / "datalist.json").read_text())["training"]
    per_rank = len(LabelledRatioBatchSampler([is_labelled(i) for i in training], 4, 0.5, num_replicas=2, rank=0))
    assert state["trainer"]["iteration"] == 2 * per_rank
    assert per_rank < len(LabelledRatioBatchSampler([is_labelled(i) for i in training], 4, 0.5))
    # one train and one validation TensorBoard writer (rank 0); epoch summaries printed once per epoch
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    logs = result.stdout + result.stderr
    assert logs.count("Key metric: val_mae best value") == 2, logs[-3000:]
