"""The bundle as the MONAI Model Zoo and its users drive it: standard workflow properties, every run id the README
names, the same architecture in training and inference configs, and runs from any working directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts import cli

ARCHITECTURE_KEYS = (
    "image_size",
    "in_channels",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "embed_dim",
    "z_dim",
    "dropout",
    "head_hidden_features",
    "head_dropout",
    "latent_norm",
    "latent_gain",
    "head_norm",
    "encoder_fp32",
)


def workflow(bundle_root, files, workflow_type, **overrides):
    files = [str(bundle_root / "configs" / f) for f in files]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        workflow_type=workflow_type,
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=False,
        bundle_root=str(bundle_root),
        **overrides,
    )
    wf.initialize()
    return wf


@pytest.mark.parametrize(
    "files, workflow_type",
    [
        (["train.yaml"], "train"),
        (["train.yaml", "evaluate.yaml"], "train"),  # the Zoo checks the evaluate overlay as a train workflow
        (["inference.yaml"], "infer"),
    ],
)
def test_standard_workflow_properties_are_all_there(
    bundle_root, slice_dataset, tiny_network, tmp_path, files, workflow_type
):
    """What ``ConfigWorkflow.check_properties`` (MONAI Label, Deploy and federated learning use it) requires."""
    overrides = {**tiny_network, "output_dir": str(tmp_path / "out"), "ckpt_path": str(tmp_path / "model.pt")}
    if workflow_type == "train":
        overrides["datalist"] = str(slice_dataset / "datalist.json")
    wf = workflow(bundle_root, files, workflow_type, **overrides)
    assert wf.check_properties() == []
    # ... and the ids are the standard ones, wired as MONAI expects
    if workflow_type == "train":
        assert wf.parser["train"]["dataset"]["transform"].replace("::", "#") == "@train#preprocessing"
        assert wf.parser["validate"]["dataset"]["transform"].replace("::", "#") == "@validate#preprocessing"
        assert wf.train_preprocessing is not None and wf.val_preprocessing is not None
    else:
        assert wf.parser["dataset"]["transform"] == "@preprocessing"
        assert wf.evaluator.__class__.__name__ == "SupervisedEvaluator"
        assert wf.inferer.__class__.__name__ == "AgeInferer"


def test_every_run_id_the_readme_names_exists_and_run_matches_the_config(bundle_root):
    text = (bundle_root / "README.md").read_text() + (bundle_root / "docs" / "README.md").read_text()
    commands = re.findall(r"monai\.bundle run (\w+)(?: [^\n]*?)? --config_file (\"\[[^\]]+\]\"|\S+)", text)
    named = set()
    for run_id, config in commands:
        files = tuple(re.findall(r"configs/(\w+)\.yaml", config))
        assert files, config
        named.add((run_id, files))
    assert {
        ("training", ("train",)),
        ("inference", ("inference",)),
        ("evaluate", ("train", "evaluate")),
        ("preprocess", ("preprocess",)),
    } <= named, named
    for run_id, files in named:
        merged = {}
        for name in files:
            merged.update(yaml.safe_load((bundle_root / "configs" / f"{name}.yaml").read_text()))
        assert run_id in merged, f"run id {run_id!r} is not in {files}"
        assert "run" in merged, f"{files} have no default `run`"
    # the default `run` of each config is its own workflow (an overlay must not fall back to training)
    for name, run_id in (
        ("train", "training"),
        ("evaluate", "evaluate"),
        ("inference", "inference"),
        ("preprocess", "preprocess"),
    ):
        content = yaml.safe_load((bundle_root / "configs" / f"{name}.yaml").read_text())
        assert content[run_id] == "@run" or content["run"] == f"@{run_id}", name


def test_training_and_inference_configs_define_the_same_network_and_slice_loading(bundle_root):
    """inference.yaml is standalone (as Model Zoo bundles are): it repeats train.yaml's architecture, kept equal."""
    train = yaml.safe_load((bundle_root / "configs" / "train.yaml").read_text())
    infer = yaml.safe_load((bundle_root / "configs" / "inference.yaml").read_text())
    for key in ARCHITECTURE_KEYS:
        assert infer[key] == train[key], key
    assert infer["network_def"] == {k: v for k, v in train["network_def"].items() if k != "_requires_"}
    assert infer["preprocessing"]["transforms"] == train["slice_loading"]
    assert infer["slice_levels"] == train["slice_levels"] == 1  # the paper's medial slice by default
    # + training-only transforms: one level drawn per image, then acquisition augmentation when any of it is on
    # (all off by default)
    for one_on, expected in ((False, 0), (True, len(train["augmentation"]))):
        parser = ConfigParser()
        parser.read_config(bundle_root / "configs" / "train.yaml")
        parser["bundle_root"] = str(bundle_root)
        if one_on:
            parser["aug_noise_prob"] = 0.2
        transforms = parser.get_parsed_content("train#preprocessing#transforms", instantiate=False, lazy=True)
        head = len(train["slice_loading"]) + len(train["level_sampling"])
        assert len(transforms) == head + expected, one_on


def test_no_config_refers_to_the_working_directory(bundle_root):
    for path in (bundle_root / "configs").glob("*.yaml"):
        text = path.read_text()
        assert "%configs/" not in text, f"{path.name}: a %-macro path is relative to the working directory"
        assert not re.search(r"['\"]\./|: \./", text), f"{path.name}: a ./ path"


def test_the_bundle_runs_from_any_working_directory(bundle_root, slice_dataset, tiny_network, tmp_path):
    """train, evaluate and infer with the config files given by absolute path, from an unrelated folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    network = []
    for key, value in tiny_network.items():
        network += [f"--{key}", json.dumps(value)]
    common = [
        "--bundle_root",
        str(bundle_root),
        "--device",
        "$torch.device('cpu')",
        *network,
        "--ckpt_path",
        str(out / "model.pt"),
        "--num_workers",
        "0",
    ]
    configs = bundle_root / "configs"

    def bundle(run_id, files, *args):
        files = [str(configs / f) for f in files]
        config = files[0] if len(files) == 1 else json.dumps(files)
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *common, *args],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)[-3000:]
        return proc.stdout + proc.stderr

    datalist = str(slice_dataset / "datalist.json")
    bundle(
        "training",
        ["train.yaml"],
        "--datalist",
        datalist,
        "--output_dir",
        str(out / "run"),
        "--max_epochs",
        "1",
        "--batch_size",
        "4",
        "--val_batch_size",
        "8",
    )
    assert (out / "model.pt").is_file() and (out / "model_bias_correction.json").is_file()
    bundle("evaluate", ["train.yaml", "evaluate.yaml"], "--datalist", datalist, "--output_dir", str(out / "eval"))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == len(json.loads((slice_dataset / "datalist.json").read_text())["test"])
    bundle(
        "inference",
        ["inference.yaml"],
        "--input",
        datalist,
        "--input_splits",
        "['disease']",
        "--output_dir",
        str(out / "infer"),
    )
    rows = (out / "infer" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(json.loads((slice_dataset / "datalist.json").read_text())["disease"])
    assert not list(elsewhere.iterdir())  # nothing written to the working directory


def test_metadata_follows_the_model_zoo(bundle_root):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    assert meta["data_type"] == "nibabel"
    assert set(meta["eval_metrics"]) >= {"mae", "r"} and all(
        isinstance(v, float) for v in meta["eval_metrics"].values()
    )
    assert isinstance(meta["pred_classes"], str) and "years" in meta["pred_classes"]
    output = meta["network_data_format"]["outputs"]["pred"]
    assert "modality" not in output and (output["type"], output["format"]) == ("tuples", "regression")
    assert meta["version"] in meta["changelog"]
    assert "no trained weights" in meta["intended_use"].lower()
    parser = ConfigParser()
    parser.read_meta(str(bundle_root / "configs" / "metadata.json"))
    assert parser.get("_meta_#network_data_format#inputs#image#spatial_shape") == [128, 128]


# The data flow as layers: a module may import only from layers below its own (so there is no cycle, and the
# folder reads bottom-up as data -> preprocessing -> network -> engine -> inference -> analyses).
LAYERS = [
    {"atomic", "cli", "mni", "precision"},  # utilities: atomic writes, command lines, MNI geometry, native bf16
    {"figures"},  # drawing only
    {"slices"},  # the model-input slice: made, written, recognised, loaded, its medial level
    {"hdbet", "dicom"},  # readers of external formats: HD-BET networks, DICOM series
    {"transforms", "quality"},  # the preprocessing chain as MONAI transforms; the image quality of a slice
    {"phantom"},  # the phantom (rendered through the chain's last step)
    {"data", "bids", "shards"},  # datalists (the embedded default generates the phantom), BIDS, shards of inputs
    {"preprocess"},  # raw scans -> slices, as a batch job
    {"networks"},
    # what the stock MONAI engines are given: batches, inferers, losses, the sampler, the resume state, checkpoints
    {"prepare_batch", "inferers", "losses", "samplers", "resume", "checkpoint"},
    {"handlers"},  # ignite handlers of training and validation (they prepare batches and run inferers)
    {"calibration"},  # age-bias correction fitted at validation
    {"inference"},  # predictions.csv writer, checkpoint checks
    {"statistics"},  # accuracy, associations, KS
    {"generative"},  # DDIM maps, reconstructions, generation, interpolation, counterfactuals
    {"report"},  # the cohort's HTML page (from predictions.csv, the chain's records and the model's calibration)
    {"analysis", "merge"},  # the command lines of the analyses and of the shard merge
]


def scripts_imports(path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scripts":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("scripts.")}
    return found - {path.stem}


def test_modules_import_only_from_the_layers_below_them(bundle_root):
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    modules = {p.stem for p in (bundle_root / "scripts").glob("*.py")} - {"__init__"}
    assert modules == set(layer_of), f"modules without a layer: {modules - set(layer_of)}"
    for name in sorted(modules):
        for imported in scripts_imports(bundle_root / "scripts" / f"{name}.py"):
            assert layer_of[imported] < layer_of[name], f"scripts.{name} imports scripts.{imported} from above"


def test_every_on_off_setting_reads_false_from_the_command_line_as_off(bundle_root):
    """``python -m monai.bundle run ... --use_ema false`` passes the string 'false', which Python reads as true: every
    reference to a true/false top-level key must go through ``scripts.cli.flag`` (static check of all configs), and
    training's EMA model must then be off."""
    for path in sorted((bundle_root / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        text = path.read_text()
        for key in (k for k, v in config.items() if isinstance(v, bool) and "#" not in k):
            for match in re.finditer(rf"@{key}\b", text):
                wrapped = text[max(0, match.start() - len("scripts.cli.flag(")) : match.end() + len(f", '{key}')")]
                assert wrapped == f"scripts.cli.flag(@{key}, '{key}')", f"{path.name}: @{key} is read without cli.flag"

    for spelt, averaged in (("false", False), ("0", False), ("no", False), ("true", True), (True, True)):
        parser = ConfigParser()
        parser.read_config(bundle_root / "configs" / "train.yaml")
        parser.update({"bundle_root": str(bundle_root), "use_ema": spelt, "network": "$torch.nn.Linear(2, 2)"})
        network, evaluated = parser.get_parsed_content("network"), parser.get_parsed_content("eval_network")
        assert (evaluated is not network) == averaged, spelt  # the EMA copy is validated and saved only when on
    parser["use_ema"] = "flase"
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("eval_network", lazy=False)
    assert "--use_ema 'flase': expected true or false" in str(cli.root_cause(error.value))
