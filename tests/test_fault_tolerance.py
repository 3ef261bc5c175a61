"""Bad datalists, a training run killed with SIGKILL, and a loss that turns NaN: nothing good is lost."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scripts.data import DatalistError, load_datalist
from scripts.handlers import NonFiniteLossError


@pytest.fixture
def images(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"slice")
    return tmp_path


@pytest.mark.parametrize(
    "content, reason",
    [
        ({"training": [{"subject": "sub-a", "age": 40}]}, "training[0]: missing 'image' path"),
        ({"training": [{"image": "a.nii.gz", "age": "forty"}]}, "training[0] (a): age 'forty' is not a number"),
        ({"training": [{"image": "a.nii.gz", "age": -3}]}, "training[0] (a): age -3 must be a finite number >= 0"),
        ({"training": [{"image": "a.nii.gz", "age": float("nan")}]}, "age nan must be a finite number >= 0"),
        (
            {"training": [{"image": "a.nii.gz", "subject": "s1"}, {"image": "b.nii.gz", "subject": "s1"}]},
            "subject s1 appears 2 times in 'training'",
        ),
        (
            {
                "training": [{"image": "a.nii.gz", "subject": "s1"}],
                "test": [{"image": "b.nii.gz", "subject": "s1", "age": 50}],
            },
            "participant s1 is in both 'training' and 'test' (data leakage;",
        ),
        ({"training": [{"image": "missing.nii.gz"}]}, "training[0] (missing): image"),
        ({"training": "a.nii.gz"}, "'training' must be a list of items"),
        ({"validation": [{"image": "a.nii.gz"}]}, "no 'training' items"),
    ],
)
def test_bad_datalists_fail_with_one_line_naming_file_and_reason(images, content, reason):
    path = images / "datalist.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DatalistError) as err:
        load_datalist(path, splits=["training"])
    message = str(err.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message


def test_unlabelled_validation_items_and_unreadable_json_are_refused(images):
    path = images / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "age": 30}], "validation": [{"image": "b.nii.gz"}]}))
    with pytest.raises(DatalistError, match="validation item b has no 'age'"):
        load_datalist(path, require_age=["validation"])
    path.write_text('{"training": [')
    with pytest.raises(DatalistError, match="not valid JSON"):
        load_datalist(path)


def test_without_splits_every_non_empty_list_is_read_and_an_asked_empty_one_refused(images):
    """A phantom with no calibration people writes ``"calibration": []``: reading the whole datalist skips it, asking
    for it by name is the one-line refusal."""
    path = images / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "age": 30}], "calibration": []}))
    assert list(load_datalist(path)) == ["training"]
    with pytest.raises(DatalistError, match="no 'calibration' items"):
        load_datalist(path, splits=["calibration"])


def test_nothing_in_a_datalist_is_evaluated(images, monkeypatch):
    monkeypatch.chdir(images)
    payload = "$__import__('pathlib').Path('PWNED').touch()"
    path = images / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "subject": payload, "age": 30, "note": payload}]}))
    (item,) = load_datalist(path)["training"]
    assert item["subject"] == item["note"] == payload  # kept as text
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "age": "$30 + 1"}]}))
    with pytest.raises(DatalistError, match="is not a number"):
        load_datalist(path)
    assert not (images / "PWNED").exists()


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoints(run_workflow, slice_dataset, tmp_path):
    settings = {
        "datalist": str(slice_dataset / "datalist.json"),
        "output_dir": str(tmp_path / "run"),
        "ckpt_path": str(tmp_path / "models" / "model.pt"),
        "batch_size": 4,
        "val_batch_size": 8,
    }
    from ignite.engine import Events

    def killed_after_epoch_1(workflow):
        trainer = workflow.parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())

    def nan_loss(workflow):  # the same run resumed, whose loss turns NaN (e.g. a NaN voxel, a diverging step)
        workflow.parser.get_parsed_content("train#loss").lambda_age = math.nan

    run_workflow("train.yaml", "training", max_epochs=2, before_run=killed_after_epoch_1, **settings)
    last, best = tmp_path / "run" / "last.pt", tmp_path / "models" / "model.pt"
    before = {path: path.read_bytes() for path in (last, best)}
    with pytest.raises(RuntimeError) as err:  # MONAI's config machinery re-raises with the expression as context
        run_workflow("train.yaml", "training", max_epochs=2, before_run=nan_loss, **settings)
    cause = err.value
    while cause is not None and not isinstance(cause, NonFiniteLossError):
        cause = cause.__cause__
    assert cause is not None, err.value
    message = str(cause)
    assert "the loss is nan at epoch 2, iteration" in message and str(last) in message and "\n" not in message
    assert {path: path.read_bytes() for path in (last, best)} == before  # neither checkpoint was touched
    trainer = torch.load(last, weights_only=True)["trainer"]
    assert trainer["iteration"] == trainer["epoch_length"]  # epoch 1
    assert not list(tmp_path.rglob(".*.tmp*"))


def test_a_training_run_killed_with_sigkill_resumes_losing_at_most_one_epoch(
    bundle_root, slice_dataset, tiny_network, tmp_path
):
    out = tmp_path / "run"
    overrides = {
        "datalist": str(slice_dataset / "datalist.json"),
        "output_dir": str(out),
        "ckpt_path": str(tmp_path / "models" / "model.pt"),
        "max_epochs": 6,
        "batch_size": 2,
        "val_batch_size": 8,
        "device": "cpu",
        "autocast_dtype": None,
        **tiny_network,
    }
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    command[command.index("--device") + 1] = "$torch.device('cpu')"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "first.log"
    with open(logs, "w") as log:
        process = subprocess.Popen(command, cwd=bundle_root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, logs.read_text()[-3000:]
    saved = torch.load(out / "last.pt", weights_only=True)  # whole: written to a temporary file, then renamed
    epoch_at_kill = saved["trainer"]["iteration"] // saved["trainer"]["epoch_length"]  # ignite stores iterations
    assert 1 <= epoch_at_kill < 6

    result = subprocess.run(command, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"Restored all variables from {out / 'last.pt'}" in log
    # only the epochs after the saved one ran again: at most the killed epoch's work was lost
    completed = [
        line for line in log.splitlines() if "SupervisedTrainer - INFO - Epoch[" in line and "Complete" in line
    ]
    assert [line.split("Epoch[")[1].split("]")[0] for line in completed] == [
        str(e) for e in range(epoch_at_kill + 1, 7)
    ]
    final = torch.load(out / "last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 6 * saved["trainer"]["epoch_length"]
    assert not list(tmp_path.rglob(".*.tmp*"))


def _files(root) -> set:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return {p.relative_to(root) for p in root.rglob("*") if not skip.intersection(p.relative_to(root).parts)}


def test_workflows_write_only_under_their_output_folders(run_workflow, bundle_root, slice_dataset, tmp_path):
    before = _files(bundle_root)
    run_workflow(
        "train.yaml",
        "training",
        datalist=str(slice_dataset / "datalist.json"),
        max_epochs=1,
        batch_size=4,
        val_batch_size=8,
        output_dir=str(tmp_path / "run"),
        ckpt_path=str(tmp_path / "models" / "model.pt"),
    )
    run_workflow(
        "inference.yaml",
        "inference",
        input=str(slice_dataset / "datalist.json"),
        input_splits=["test"],
        output_dir=str(tmp_path / "predicted"),
        ckpt_path=str(tmp_path / "models" / "model.pt"),
    )
    assert _files(bundle_root) == before  # nothing new in the bundle (or the current folder, which is the bundle)
    assert {p.name for p in tmp_path.iterdir()} == {"run", "models", "predicted"}
    assert {p.name for p in (tmp_path / "models").iterdir()} == {
        "model.pt",
        "model_bias_correction.json",
        "model_interval.json",
    }


def test_checkpoint_saves_are_atomic_and_clear_temporaries_of_a_killed_save(tmp_path):
    from scripts.checkpoint import _AtomicFileSaver

    (tmp_path / "last.pt").write_bytes(b"previous complete checkpoint")
    (tmp_path / ".last.pt.tmp4242").write_bytes(b"half a checkpoint")  # the save a SIGKILL interrupted
    (tmp_path / ".other.pt.tmp4242").write_bytes(b"not ours")
    _AtomicFileSaver(tmp_path, "last.pt")({"weight": torch.ones(3)}, "ignored-name.pt")
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["weight"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.tmp4242", "last.pt"]


def test_a_checkpoint_save_that_fails_half_way_leaves_the_previous_file_loadable(tmp_path, monkeypatch):
    """The best model and last.pt go through the same saver: a save that dies mid-write must not touch them."""
    from scripts.checkpoint import _AtomicFileSaver

    saver = _AtomicFileSaver(tmp_path, "model.pt")
    saver({"weight": torch.ones(3)}, "ignored.pt")
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # keep only the first half of what was written, then the process "dies"
            fh.truncate(max(1, fh.seek(0, 2) // 2))
        raise OSError("killed while saving")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="killed while saving"):
        saver({"weight": torch.zeros(3)}, "ignored.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], torch.ones(3))


def test_atomic_writes_keep_the_old_file_when_writing_fails_and_keep_the_extension(tmp_path):
    from scripts.atomic import temporary_path, write_atomic, write_json

    target = write_json(tmp_path / "sub" / "record.json", {"status": "ok"})
    assert json.loads(target.read_text()) == {"status": "ok"}

    def crash(tmp):
        tmp.write_text('{"status": "ha')  # the kill or error comes half-way through
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, crash)
    assert json.loads(target.read_text()) == {"status": "ok"} and sorted(os.listdir(target.parent)) == ["record.json"]
    # writers that pick the format by suffix (nibabel, numpy, matplotlib) see the target's extension
    assert temporary_path(tmp_path / "s.nii.gz").name.endswith(".nii.gz")
    assert temporary_path(tmp_path / "qc.png").name.startswith(".qc.png.tmp")
