"""Sharded preprocessing and inference (``--shard i/N``) and the merge that joins them."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import shards

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def merge(output_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.merge", str(output_dir)], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("3/2", "i must be 0 to N-1"),
        ("2/2", "i must be 0 to N-1"),
        ("1/0", "i must be 0 to N-1"),
        ("a/b", "expected i/N"),
        ("-1/4", "expected i/N"),
        ("3", "expected i/N"),
    ],
)
def test_bad_shard_specs_are_one_line_errors(spec, reason):
    with pytest.raises(shards.ShardError, match=reason):
        shards.parse_shard(spec)


def test_shards_partition_the_inputs_deterministically():
    assert shards.parse_shard(None) is None and shards.parse_shard("0/1") is None
    assert shards.parse_shard(" 2 / 4 ") == shards.Shard(2, 4)
    items = [{"image": f"/data/scan{i:02d}.nii.gz"} for i in (5, 3, 9, 1, 7, 2, 8)] + [{"image": "/data/scan03.nii.gz"}]
    parts = [shards.select(items, shards.Shard(i, 3)) for i in range(3)]
    images = [sorted({it["image"] for it in part}) for part in parts]
    assert sorted(sum(images, [])) == sorted({it["image"] for it in items})  # each input in exactly one shard
    assert [len(part) for part in images] == [3, 2, 2]  # balanced
    # sorted: scan01 02 03 05 07 08 09 -> shard 2 holds the 3rd and 6th; a repeated input stays in its one shard
    assert images[2] == ["/data/scan03.nii.gz", "/data/scan08.nii.gz"]
    assert sum(it["image"] == "/data/scan03.nii.gz" for it in parts[2]) == 2
    assert [shards.select(items[::-1], shards.Shard(i, 3)) for i in range(3)] == [p[::-1] for p in parts]


def test_sharded_inference_merges_into_the_unsharded_predictions(run_workflow, trained_model, tmp_path):
    settings = dict(
        input=str(trained_model["datalist"]),
        input_splits=["test"],
        ckpt_path=str(trained_model["ckpt_path"]),
        num_workers=1,
    )
    run_workflow("inference.yaml", "inference", output_dir=str(tmp_path / "whole"), **settings)
    sharded = tmp_path / "sharded"
    for i in range(3):
        run_workflow("inference.yaml", "inference", output_dir=str(sharded), shard=f"{i}/3", **settings)
    assert not (sharded / "predictions.csv").exists() and not (sharded / "report.html").exists()
    records = sorted(p.name for p in (sharded / "shards").glob("*.json"))
    assert records == [f"shard-000{i}-of-0003.json" for i in range(3)]

    # one shard missing: refused, naming it
    hidden = sharded / "shards" / "shard-0001-of-0003.json"
    hidden.rename(hidden.with_suffix(".off"))
    result = merge(sharded)
    assert result.returncode == 2 and "shard(s) 1 of 3 have not finished" in result.stderr
    hidden.with_suffix(".off").rename(hidden)

    result = merge(sharded)
    assert result.returncode == 0, result.stderr
    # the merge writes the whole set's report, describing the model the shards used
    page = (sharded / "report.html").read_text()
    assert f"Brain-age report: {len(read_csv(sharded / 'predictions.csv'))} scans" in page
    assert str(trained_model["ckpt_path"]) in page
    whole = {r["subject"]: r for r in read_csv(tmp_path / "whole" / "predictions.csv")}
    merged = {r["subject"]: r for r in read_csv(sharded / "predictions.csv")}
    assert set(merged) == set(whole) and len(merged) == len(read_csv(sharded / "predictions.csv"))
    for subject, row in whole.items():
        assert float(merged[subject]["predicted_age"]) == pytest.approx(float(row["predicted_age"]), abs=0.05)
        assert merged[subject]["age"] == row["age"]

    # the same shard twice (e.g. copied in from another run), and shards of different counts
    shutil.copy(hidden, sharded / "shards" / "shard-0001-of-0003-copy.json")
    assert "shard(s) 1 of 3 appear more than once" in merge(sharded).stderr
    (sharded / "shards" / "shard-0001-of-0003-copy.json").unlink()
    record = json.loads(hidden.read_text())
    (sharded / "shards" / "shard-0000-of-0002.json").write_text(json.dumps({**record, "shard": 0, "count": 2}))
    assert "shards of different counts N (2, 3)" in merge(sharded).stderr
    (sharded / "shards" / "shard-0000-of-0002.json").unlink()

    # an input in two shards
    first = sharded / "shards" / "predictions.shard-0000-of-0003.csv"
    second = sharded / "shards" / "predictions.shard-0001-of-0003.csv"
    duplicated = read_csv(second)
    duplicated[0]["image"] = read_csv(first)[0]["image"]
    with open(second, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(duplicated[0]))
        writer.writeheader()
        writer.writerows(duplicated)
    assert "(duplicate input)" in merge(sharded).stderr


def test_an_empty_shard_and_a_bad_spec_from_the_workflow(run_workflow, trained_model, slice_dataset, tmp_path):
    one = slice_dataset / json.loads((slice_dataset / "datalist.json").read_text())["test"][0]["image"]
    settings = dict(input=str(one), ckpt_path=str(trained_model["ckpt_path"]), output_dir=str(tmp_path))
    run_workflow("inference.yaml", "inference", shard="1/2", **settings)  # one input, two shards: shard 1 is empty
    assert read_csv(tmp_path / "shards" / "predictions.shard-0001-of-0002.csv") == []
    assert json.loads((tmp_path / "shards" / "shard-0001-of-0002.json").read_text())["inputs"] == 0
    with pytest.raises(RuntimeError) as raised:  # monai.bundle wraps what a config expression raises
        run_workflow("inference.yaml", "inference", shard="3/2", **settings)
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, shards.ShardError) and str(cause).startswith("shard '3/2': i must be 0 to N-1")


def test_sharded_preprocessing_merges_manifest_datalist_and_montage(volume_dataset, tmp_path):
    datalist = json.loads((volume_dataset / "datalist.json").read_text())
    items = [it for its in datalist.values() for it in its][:2]
    raw = {"training": [{**it, "image": str(volume_dataset / it["image"])} for it in items]}
    raw["training"].append({"image": str(tmp_path / "missing.nii.gz"), "subject": "missing"})
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    out = tmp_path / "prep"
    for i in range(2):
        command = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "preprocess",
            "--config_file",
            "configs/preprocess.yaml",
            "--datalist",
            str(tmp_path / "raw.json"),
            "--output_dir",
            str(out),
            "--skull_strip",
            "template",
            "--num_workers",
            "1",
            "--shard",
            f"{i}/2",
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "manifest.csv").exists()
    result = merge(out)
    assert result.returncode == 0, result.stderr
    rows = {r["subject"]: r for r in read_csv(out / "manifest.csv")}
    assert set(rows) == {items[0]["subject"], items[1]["subject"], "missing"}
    assert rows["missing"]["status"] == "failed" and "No such file" in rows["missing"]["reason"]
    merged = json.loads((out / "datalist.json").read_text())
    assert sorted(it["subject"] for it in merged["training"]) == sorted(it["subject"] for it in items)
    assert all((out / it["image"]).is_file() for it in merged["training"])
    assert (out / "qc_montage.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(command[:-1] + ["3/2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "shard '3/2': i must be 0 to N-1" in bad.stderr
