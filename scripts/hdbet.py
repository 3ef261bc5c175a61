"""HD-BET brain extraction (Isensee et al., Hum Brain Mapp 2019), run offline from a chosen weights folder.

HD-BET 2.x is an nnU-Net model. Its command line (``hd-bet``) downloads the weights on first use, reads
them from a fixed folder (``~/hd-bet_params/release_2.0.0``) and starts a dozen helper processes per
call. Here the same pieces run in-process, one volume at a time, from any folder:

* the predictor comes from HD-BET's own ``get_hdbet_predictor`` (its tiling, Gaussian weighting,
  test-time mirroring switch and ``torch.compile`` setting), pointed at ``weights_dir``;
* the volume goes through nnU-Net exactly as a file would: written as NIfTI in the MNI152 axis order
  HD-BET asks for, read back with the reader named in the weights' ``plans.json``, predicted with
  ``nnUNetPredictor.predict_single_npy_array`` and written back with the same writer.

The weights are never downloaded (``maybe_download_parameters`` is not called); see
``docs/preprocessing.md`` for installing them offline.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pkgutil
import sys
import tempfile
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

# Where the hd-bet package itself looks (HD_BET.paths.folder_with_parameter_files).
DEFAULT_WEIGHTS_DIR = Path.home() / "hd-bet_params" / "release_2.0.0"
CHECKPOINT = Path("fold_all") / "checkpoint_final.pth"
REQUIRED_FILES = ("plans.json", "dataset.json", str(CHECKPOINT))


def weights_dir_or_default(weights_dir: str | os.PathLike | None) -> Path:
    return Path(weights_dir).expanduser() if weights_dir else DEFAULT_WEIGHTS_DIR


def missing_weight_files(weights_dir: str | os.PathLike | None) -> list[str]:
    """The files of an unzipped HD-BET release that ``weights_dir`` lacks (empty when complete)."""
    folder = weights_dir_or_default(weights_dir)
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def describe_weights(weights_dir: str | os.PathLike | None) -> dict:
    """What an HD-BET weights folder holds: trainer class, nnU-Net configuration and network."""
    folder = weights_dir_or_default(weights_dir)
    missing = missing_weight_files(folder)
    if missing:
        raise FileNotFoundError(f"{folder}: not an HD-BET weights folder, missing {', '.join(missing)}")
    checkpoint = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    configuration = checkpoint["init_args"]["configuration"]
    plans = json.loads((folder / "plans.json").read_text())["configurations"][configuration]
    return {
        "weights_dir": str(folder),
        "trainer": str(checkpoint["trainer_name"]),
        "configuration": configuration,
        "network": plans.get("architecture", {}).get("network_class_name", plans.get("UNet_class_name", "?")),
    }


def find_trainer_class(name: str):
    """nnU-Net's trainer lookup by class name, skipping trainer modules whose optional packages are absent.

    nnU-Net imports the modules under ``nnunetv2.training.nnUNetTrainer`` one by one until one
    defines ``name`` and stops at the first that fails to import; its Primus trainers need timm and
    with it torchvision, which this bundle leaves out so that the CPU torch stays. Without this,
    weights whose checkpoint names any trainer but the base one (HD-BET's README says it was trained
    with nnUNetTrainerDA5) could not be loaded here.
    """
    import nnunetv2.training.nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer_package = nnunetv2.training.nnUNetTrainer
    for module_info in pkgutil.walk_packages(
        trainer_package.__path__, f"{trainer_package.__name__}.", onerror=lambda _: None
    ):
        try:
            module = importlib.import_module(module_info.name)
        except ModuleNotFoundError:
            continue
        found = getattr(module, name, None)
        if isinstance(found, type) and issubclass(found, nnUNetTrainer):
            return found
    raise RuntimeError(f"nnU-Net {version('nnunetv2')} has no trainer class {name!r} (named in the HD-BET checkpoint)")


@lru_cache(maxsize=2)
def load_predictor(weights_dir: str, device: str = "cpu", tta: bool = False):
    """HD-BET's nnU-Net predictor for the weights in ``weights_dir``, built once per process."""
    missing = missing_weight_files(weights_dir)
    if missing:
        raise FileNotFoundError(f"{weights_dir}: not an HD-BET weights folder, missing {', '.join(missing)}")
    threads, stdout = torch.get_num_threads(), sys.stdout
    try:
        from HD_BET import hd_bet_prediction  # silences nnU-Net's import messages, then resets sys.stdout
    finally:
        sys.stdout = stdout
    from nnunetv2.inference import predict_from_raw_data

    # get_hdbet_predictor reads the folder from this module attribute; everything else is HD-BET's.
    hd_bet_prediction.folder_with_parameter_files = str(weights_dir)
    nnunet_lookup = predict_from_raw_data.recursive_find_trainer_class_by_name
    predict_from_raw_data.recursive_find_trainer_class_by_name = find_trainer_class
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net reports its settings on stdout
            predictor = hd_bet_prediction.get_hdbet_predictor(use_tta=tta, device=torch.device(device), verbose=False)
    finally:
        predict_from_raw_data.recursive_find_trainer_class_by_name = nnunet_lookup
    predictor.allow_tqdm = False
    torch.set_num_threads(threads)  # on CPU HD-BET claims every core, which oversubscribes parallel workers
    return predictor


def predict_brain_mask(
    volume: np.ndarray,
    affine: np.ndarray,
    weights_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    tta: bool = False,
) -> np.ndarray:
    """Brain mask (bool, same shape) of a 3D ``volume`` indexed ``[x, y, z]`` with voxel->RAS ``affine``."""
    predictor = load_predictor(str(weights_dir_or_default(weights_dir)), device, tta)
    io_class = predictor.plans_manager.image_reader_writer_class
    # HD-BET expects the MNI152 (FSL standard, LAS) axis order; nibabel re-lays the volume out for us.
    las = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LAS"))
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine).as_reoriented(las)
    with tempfile.TemporaryDirectory(prefix="hdbet-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        image_file, mask_file = os.path.join(tmp, "image.nii.gz"), os.path.join(tmp, "mask.nii.gz")
        nib.save(image, image_file)
        data, properties = io_class().read_images([image_file])
        segmentation = predictor.predict_single_npy_array(data, properties)
        io_class().write_seg(segmentation, mask_file, properties)
        mask = nib.load(mask_file)
        back = nib.orientations.ornt_transform(nib.io_orientation(mask.affine), nib.io_orientation(affine))
        return np.asarray(mask.as_reoriented(back).dataobj) > 0


def main(argv: list[str] | None = None) -> int:
    from scripts import cli

    parser = cli.ArgumentParser(
        prog="python -m scripts.hdbet",
        description="Check an offline HD-BET weights folder: the files the bundle needs, the nnU-Net trainer "
        "class its checkpoint names (and that nnU-Net can build it here), the network.",
    )
    parser.add_argument("--weights-dir", default=str(DEFAULT_WEIGHTS_DIR), help="unzipped HD-BET release")
    args = parser.parse_args(argv)
    try:
        info = describe_weights(args.weights_dir)
        trainer = find_trainer_class(info["trainer"])
    except (FileNotFoundError, RuntimeError, KeyError) as err:
        parser.error(str(err))
    print(
        f"{info['weights_dir']}: HD-BET weights for nnU-Net {info['configuration']}, network {info['network']}, "
        f"trainer {info['trainer']} ({trainer.__module__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
