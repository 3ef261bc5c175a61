"""The training workflow of configs/train.yaml, run through MONAI's bundle machinery on tiny settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from ignite.engine import Events


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
    best = torch.load(outputs["ckpt_path"], weights_only=True)
    # the best validation MAE is the saved model's: its ages on the validation images, recomputed here
    model = wf.parser.get_parsed_content("network_def")
    model.load_state_dict(best)
    model.eval()
    dataset = wf.parser.get_parsed_content("validate#dataset")
    with torch.no_grad():
        images = torch.stack([torch.as_tensor(item["image"]) for item in dataset])
        ages = torch.tensor([float(item["age"]) for item in dataset])
        predicted = model(images[..., 0]).reshape(-1)  # (B, C, H, W, levels): one level
    assert evaluator.state.best_metric == pytest.approx(float((predicted - ages).abs().mean()), rel=1e-4)
    assert "age_head.age_mean" in best  # the weights only, loadable without pickled code
    network = wf.parser.get_parsed_content("network")
    assert set(best) == set(network.state_dict())
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(last) == {
        "settings",
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


def test_the_saved_batchnorm_statistics_are_exact_on_the_un_augmented_training_images(
    run_workflow, slice_dataset, outputs
):
    """With augmentation on, the latent standardisation of the saved model still holds the mean and variance of the
    encoder's features over the training images as they are (not over random augmented views of them)."""
    wf = run_training(
        run_workflow,
        datalist=str(slice_dataset / "datalist.json"),
        max_epochs=1,
        aug_noise_prob=1.0,
        aug_contrast_prob=1.0,
        **outputs,
    )
    model = wf.parser.get_parsed_content("network_def")
    model.load_state_dict(torch.load(outputs["ckpt_path"], weights_only=True))
    model.eval()
    loading = wf.parser.get_parsed_content("validate#preprocessing")  # the slice files as inference reads them
    images = torch.stack([loading(dict(item))["image"][..., 0] for item in wf.parser.get_parsed_content("train_items")])
    with torch.no_grad():
        features = model.encoder.features(images)
    norm = model.encoder.latent_norm
    torch.testing.assert_close(norm.running_mean, features.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.running_var, features.var(0), rtol=1e-4, atol=1e-5)


def test_without_ema_the_trained_network_is_validated_and_saved(run_workflow, slice_dataset, outputs):
    wf = run_training(
        run_workflow, datalist=str(slice_dataset / "datalist.json"), max_epochs=1, use_ema=False, **outputs
    )
    network = wf.parser.get_parsed_content("network")
    assert wf.parser.get_parsed_content("validate#evaluator").network is network
    best = torch.load(outputs["ckpt_path"], weights_only=True)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(best[key], value, rtol=0, atol=0)


def learning_rates(workflow, seen: list) -> None:
    """Record the learning rate of every epoch the workflow's trainer runs."""
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: seen.append(optimizer.param_groups[0]["lr"]))


def test_interrupted_run_resumes_with_epoch_count_optimizer_state_and_schedule(
    run_workflow, slice_dataset, outputs, tmp_path
):
    datalist = str(slice_dataset / "datalist.json")
    rates: list[float] = []

    def stop_after_epoch_1(workflow):  # the kill: last.pt of epoch 1 is written, epoch 2 never starts
        learning_rates(workflow, rates)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())

    first = run_training(run_workflow, datalist=datalist, max_epochs=3, before_run=stop_after_epoch_1, **outputs)
    steps_per_epoch = first.parser.get_parsed_content("train#trainer").state.epoch_length
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {steps_per_epoch}

    second = run_training(
        run_workflow, datalist=datalist, max_epochs=3, before_run=lambda wf: learning_rates(wf, rates), **outputs
    )
    trainer = second.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3
    assert trainer.state.iteration == 3 * steps_per_epoch  # continued, not restarted
    optimizer = second.parser.get_parsed_content("optimizer")
    assert {int(s["step"]) for s in optimizer.state.values()} == {3 * steps_per_epoch}
    # the cosine schedule of one 3-epoch run, not a restarted one
    assert rates == pytest.approx([1e-4 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)], rel=1e-6)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [("max_epochs", 3, "max_epochs 1 there, 3 now"), ("learning_rate", 3e-4, "learning_rate 0.0001 there, 0.0003 now")],
)
def test_resuming_with_other_settings_is_refused_in_one_line(
    run_workflow, slice_dataset, outputs, tmp_path, key, value, shown
):
    """Resuming a 1-epoch run with --max_epochs 3 used to restore the old cosine schedule (lr 1e-4, 0, 1e-4, 0)."""
    from scripts.cli import root_cause
    from scripts.resume import ResumeMismatchError

    datalist = str(slice_dataset / "datalist.json")
    run_training(run_workflow, datalist=datalist, max_epochs=1, **outputs)
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(Exception) as raised:
        run_training(run_workflow, datalist=datalist, **{"max_epochs": 1, key: value}, **outputs)
    err = root_cause(raised.value)
    assert isinstance(err, ResumeMismatchError)
    assert shown in str(err) and str(last) in str(err) and "\n" not in str(err)
    assert last.read_bytes() == before  # nothing was overwritten


def test_a_bad_datalist_is_reported_in_one_line_on_the_command_line(bundle_root, tmp_path):
    """monai.bundle wraps what a config expression raises in RuntimeError tracebacks; the bundle prints the reason."""
    bad = tmp_path / "bad.json"
    item = {"image": "missing.nii.gz", "age": 50}
    bad.write_text(json.dumps({"training": [item], "validation": [item]}))
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
        + ["--datalist", str(bad), "--output_dir", str(tmp_path / "run"), "--ckpt_path", str(tmp_path / "m.pt")],
        cwd=bundle_root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    reason = f"{bad}: training[0] (missing): image {tmp_path / 'missing.nii.gz'} does not exist"
    assert proc.stderr.strip().splitlines()[-1] == f"error: {reason}"
    assert "Traceback" not in proc.stderr


def test_unlabelled_scans_train_the_diffusion_arm_only(run_workflow, slice_dataset, outputs):
    """The datalist's unlabelled items reach the trainer with NaN ages, batches mix both kinds, and through the
    configured prepare_batch, inferer and loss an unlabelled image sends gradient to the encoder and the U-Net but
    none to the age head; a labelled one reaches the head too."""
    wf = run_training(run_workflow, datalist=str(slice_dataset / "datalist.json"), max_epochs=1, **outputs)
    sampler = wf.parser.get_parsed_content("train#sampler")
    dataset = wf.parser.get_parsed_content("train#dataset")
    batch = next(iter(sampler))
    ages = torch.tensor([float(dataset[i]["age"]) for i in batch])
    assert torch.isnan(ages).sum() == 2 and (~torch.isnan(ages)).sum() == 2  # labelled_ratio 0.5 of 4

    from monai.data import list_data_collate

    network = wf.parser.get_parsed_content("network")
    prepare = wf.parser.get_parsed_content("train#prepare_batch")
    inferer = wf.parser.get_parsed_content("train#inferer")
    loss_function = wf.parser.get_parsed_content("train#loss")
    unlabelled = [i for i in range(len(dataset)) if math.isnan(float(dataset[i]["age"]))][:2]
    labelled = [i for i in range(len(dataset)) if not math.isnan(float(dataset[i]["age"]))][:2]

    def gradients(indices):
        network.train()
        network.zero_grad(set_to_none=False)
        images, targets, _, kwargs = prepare(list_data_collate([dataset[i] for i in indices]), torch.device("cpu"))
        loss_function(inferer(images, network, **kwargs), targets).backward()
        return {
            part: sum(float(p.grad.abs().sum()) for p in getattr(network, part).parameters())
            for part in ("encoder", "unet", "age_head")
        }

    only_unlabelled, only_labelled = gradients(unlabelled), gradients(labelled)
    assert only_unlabelled["encoder"] > 0 and only_unlabelled["unet"] > 0
    assert only_unlabelled["age_head"] == 0.0
    assert only_labelled["age_head"] > 0


def test_embedded_default_generates_the_phantom_once(run_workflow, outputs, tmp_path):
    dataset_dir = tmp_path / "phantom"
    small = "$scripts.data.embedded_phantom(@dataset_dir, n=24, n_disease=4, n_calibration=4)"
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
