"""Run the MONAI Model Zoo's own CI checks on a copy of this bundle, as a reviewer would on a pull request.

    .venv/bin/python tests/model_zoo_checks.py --zoo /path/to/Project-MONAI/model-zoo [--name brain_age_diffae]

Needs a checkout of https://github.com/Project-MONAI/model-zoo (its ``ci/`` scripts are run, not copied). In a
scratch copy of the Zoo's layout (``models/<name>/`` = the tracked files of this bundle) it runs:

1. ``ci/get_bundle_requirements.py``: the requirements file the Zoo's CI installs from ``metadata.json``;
2. ``ci/verify_bundle.py -m min`` and ``-m full``: directory, version/changelog, metadata schema, workflow
   properties, network input/output shapes and TorchScript export, with stand-in weights made the way the
   Zoo's CI makes them (``_produce_fake_weights``: the state dict of the inference config's ``network_def``);
3. the property checks of ``ci/unit_tests`` (``ConfigWorkflow.check_properties``) for the train config, the
   evaluate overlay (as a train workflow, as the Zoo does) and the inference config.

Where a check would reach the network, its logic is reproduced offline: the metadata schema comes from the
copy this bundle ships (``configs/schema``) instead of ``ci/prepare_schema.py``'s download, and the Zoo's
``models/model_info.json`` (the released bundles' versions) is an empty record, as for a new bundle. Not part of
the default suite (it needs the Zoo checkout); docs/model_zoo.md records its output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [name for name in listed if (ROOT / name).is_file()]


def step(title: str, command: list[str], cwd: Path) -> bool:
    print(f"\n=== {title}\n$ {' '.join(command)}", flush=True)
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    lines = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "it/s]" not in line and "subject/s]" not in line
    ]
    print("\n".join(lines[-15:]))
    print(f"--> {'PASS' if proc.returncode == 0 else f'FAIL (exit {proc.returncode})'}", flush=True)
    return proc.returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, help="a checkout of Project-MONAI/model-zoo")
    parser.add_argument("--name", default="brain_age_diffae", help="the bundle's folder name under models/")
    parser.add_argument("--keep", action="store_true", help="keep the scratch Zoo copy and print its path")
    args = parser.parse_args(argv)
    zoo_ci = Path(args.zoo) / "ci"
    if not (zoo_ci / "verify_bundle.py").is_file():
        parser.error(f"{args.zoo}: not a model-zoo checkout (no ci/verify_bundle.py)")

    scratch = Path(tempfile.mkdtemp(prefix="model_zoo_"))
    shutil.copytree(zoo_ci, scratch / "ci")
    bundle = scratch / "models" / args.name
    for name in tracked_files():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, bundle / name)
    (scratch / "models" / "model_info.json").write_text("{}")  # a new bundle: no released version yet
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    schema = bundle / "configs" / "schema" / meta["schema"].split("/")[-1]
    (bundle / "eval").mkdir(exist_ok=True)
    shutil.copyfile(schema, bundle / "eval" / "schema.json")  # what ci/prepare_schema.py would download
    python = sys.executable
    stand_in = (
        f"import sys; sys.path[:0] = ['ci', 'models/{args.name}']; from verify_bundle import "
        f"_produce_fake_weights; _produce_fake_weights('models/{args.name}/configs/inference.yaml', "
        f"'models/{args.name}/configs/metadata.json', '{args.name}', 'cpu')"
    )
    properties = (
        "import sys; sys.path.insert(0, 'models/{name}'); from monai.bundle import ConfigWorkflow\n"
        "root = 'models/{name}'\n"
        "checks = [('train', [root + '/configs/train.yaml']), ('train', [root + '/configs/train.yaml', "
        "root + '/configs/evaluate.yaml']), ('infer', [root + '/configs/inference.yaml'])]\n"
        "for kind, files in checks:\n"
        "    wf = ConfigWorkflow(workflow_type=kind, config_file=files if len(files) > 1 else files[0], "
        "meta_file=root + '/configs/metadata.json', logging_file=root + '/configs/logging.conf', "
        "bundle_root=root, dataset_dir=root + '/data/phantom')\n"
        "    wf.initialize()\n"
        "    missing = wf.check_properties()\n"
        "    print(kind, [f.split('/')[-1] for f in files], 'missing or wrong:', missing)\n"
        "    assert missing == [], missing\n"
    ).format(name=args.name)
    results = {
        "get_bundle_requirements": step(
            "ci/get_bundle_requirements.py", [python, "ci/get_bundle_requirements.py", "--b", args.name], scratch
        ),
        "stand-in weights": step(
            "stand-in weights (ci/verify_bundle.py _produce_fake_weights)", [python, "-c", stand_in], scratch
        ),
    }
    shutil.move(str(scratch / "model.pt"), bundle / "models" / "model.pt")  # both modes need models/model.pt
    results["verify_bundle min"] = step(
        "ci/verify_bundle.py -m min", [python, "ci/verify_bundle.py", "-b", args.name, "-m", "min"], scratch
    )
    results["verify_bundle full"] = step(
        "ci/verify_bundle.py -m full", [python, "ci/verify_bundle.py", "-b", args.name, "-m", "full"], scratch
    )
    results["property checks (ci/unit_tests)"] = step(
        "ConfigWorkflow.check_properties, as ci/unit_tests", [python, "-c", properties], scratch
    )
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results.items()))
    if args.keep:
        print(f"scratch Zoo copy: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
