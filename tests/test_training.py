"""The training workflow of configs/train.yaml, run through MONAI's bundle machinery on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def run_training(run_workflow, **overrides):
    settings = {"batch_size": 4, "val_batch_size": 8, "max_epochs": 2, **overrides}
    return run_workflow("train.yaml", "training", **settings)


@pytest.fixture
def outputs(tmp_path):
    return {"output_dir": str(tmp_path / "run"), "ckpt_path": str(tmp_path / "models" / "best.pt")}


def test_training_writes_best_model_last_state_and_logs(run_workflow, slice_dataset, outputs, tmp_path):
    wf = run_training(run_workflow, datalist=str(slice_dataset / "datalist.json"), **outputs)
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert trainer.state.epoch == 2
    assert set(evaluator.state.metrics) == {"val_mae", "val_r", "val_wrong_z_penalty"}
    assert 0 < evaluator.state.metrics["val_mae"] < 100
    best = torch.load(outputs["ckpt_path"], weights_only=True)
    assert "age_head.age_mean" in best  # the weights only, loadable without pickled code
    network = wf.parser.get_parsed_content("network")
    assert set(best) == set(network.state_dict())
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(last) == {
        "network",
        "optimizer",
        "lr_scheduler",
        "trainer",
        "ema",
        "best_metric",
        "best_model_saver",
        "random_state",
    }
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"]
    assert list((tmp_path / "run").glob("events.out.tfevents.*")), "TensorBoard events expected"
    assert not list(tmp_path.rglob(".*.tmp*")), "no temporary checkpoint files left behind"
    # Age statistics come from the labelled training ages, not the defaults.
    items = json.loads((slice_dataset / "datalist.json").read_text())["training"]
    ages = [it["age"] for it in items if "age" in it]
    assert float(best["age_head.age_mean"]) == pytest.approx(sum(ages) / len(ages), rel=1e-5)


def test_validation_and_the_checkpoint_use_the_ema_weights(run_workflow, slice_dataset, outputs, tmp_path):
    """ignite's EMAHandler averages the weights every step; the evaluator validates that average and the best-model
    file holds it (with exact BatchNorm statistics), not the last online weights."""
    wf = run_training(
        run_workflow,
        datalist=str(slice_dataset / "datalist.json"),
        max_epochs=1,
        ema_momentum=0.2,
        ema_warmup_momentum=0.5,
        ema_warmup_iters=2,
        **outputs,
    )
    network = wf.parser.get_parsed_content("network")
    ema_model = wf.parser.get_parsed_content("ema").ema_model
    assert wf.parser.get_parsed_content("validate#evaluator").network is ema_model
    best = torch.load(outputs["ckpt_path"], weights_only=True)
    online = network.state_dict()
    for key, value in ema_model.state_dict().items():
        torch.testing.assert_close(best[key], value, rtol=0, atol=0)
    weights = [key for key in best if key.endswith("weight") and best[key].dtype == torch.float32]
    moved = [key for key in weights if not torch.equal(best[key], online[key])]
    assert len(moved) > 0.5 * len(weights)  # the average lags the online weights
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key, value in ema_model.state_dict().items():  # the resumable state carries the EMA too
        torch.testing.assert_close(last["ema"]["model"][key], value, rtol=0, atol=0)


def test_without_ema_the_trained_network_is_validated_and_saved(run_workflow, slice_dataset, outputs):
    wf = run_training(
        run_workflow, datalist=str(slice_dataset / "datalist.json"), max_epochs=1, use_ema=False, **outputs
    )
    network = wf.parser.get_parsed_content("network")
    assert wf.parser.get_parsed_content("validate#evaluator").network is network
    best = torch.load(outputs["ckpt_path"], weights_only=True)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(best[key], value, rtol=0, atol=0)


def test_interrupted_run_resumes_with_epoch_count_and_optimizer_state(run_workflow, slice_dataset, outputs, tmp_path):
    datalist = str(slice_dataset / "datalist.json")
    first = run_training(run_workflow, datalist=datalist, max_epochs=1, **outputs)
    steps_per_epoch = first.parser.get_parsed_content("train#trainer").state.epoch_length
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {steps_per_epoch}

    second = run_training(run_workflow, datalist=datalist, max_epochs=3, **outputs)
    trainer = second.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3
    assert trainer.state.iteration == 3 * steps_per_epoch  # continued, not restarted
    optimizer = second.parser.get_parsed_content("optimizer")
    assert {int(s["step"]) for s in optimizer.state.values()} == {3 * steps_per_epoch}
    scheduler = second.parser.get_parsed_content("lr_scheduler")
    assert scheduler.last_epoch == 3


def test_unlabelled_scans_train_the_diffusion_arm_only(run_workflow, slice_dataset, outputs):
    """The datalist's unlabelled items reach the trainer with NaN ages; batches mix both kinds."""
    wf = run_training(run_workflow, datalist=str(slice_dataset / "datalist.json"), max_epochs=1, **outputs)
    sampler = wf.parser.get_parsed_content("train#sampler")
    dataset = wf.parser.get_parsed_content("train#dataset")
    batch = next(iter(sampler))
    ages = torch.tensor([float(dataset[i]["age"]) for i in batch])
    assert torch.isnan(ages).sum() == 2 and (~torch.isnan(ages)).sum() == 2  # labelled_ratio 0.5 of 4


def test_embedded_default_generates_the_phantom_once(run_workflow, outputs, tmp_path):
    dataset_dir = tmp_path / "phantom"
    small = "$scripts.data.embedded_phantom(@dataset_dir, n=24)"
    run_training(run_workflow, dataset_dir=str(dataset_dir), datalist=small, max_epochs=1, **outputs)
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) + len(datalist["test"]) == 24
    stamp = (dataset_dir / "phantom.json").stat().st_mtime_ns
    run_training(
        run_workflow,
        dataset_dir=str(dataset_dir),
        datalist=small,
        max_epochs=1,
        output_dir=str(tmp_path / "run2"),
        ckpt_path=outputs["ckpt_path"],
    )
    assert (dataset_dir / "phantom.json").stat().st_mtime_ns == stamp  # reused, not regenerated


def test_metadata_verifies_offline(bundle_root):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "configs/metadata.json",
            "--filepath",
            "configs/schema/meta_schema_20240725.json",
        ],
        cwd=bundle_root,
        capture_output=True,
        text=True,
        env={"PATH": "", "NO_PROXY": "*", "HTTPS_PROXY": "http://0.0.0.0:9"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "metadata is verified with no error" in proc.stdout + proc.stderr


def test_metadata_schema_rejects_incomplete_metadata(bundle_root, tmp_path):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(bad),
            "--filepath",
            str(bundle_root / "configs" / "schema" / "meta_schema_20240725.json"),
        ],
        cwd=bundle_root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "num_channels" in proc.stderr
