"""Does the test suite catch the bugs its tests are named for? Plant each bug of a list, one at a time, in a temporary
copy of the bundle, run only the tests named for it, and report which bugs survive.

    .venv/bin/python tests/mutation_check.py                 # every mutant (about 8 min on 2 cores)
    .venv/bin/python tests/mutation_check.py --list          # the mutants and the tests named for each
    .venv/bin/python tests/mutation_check.py --only resume-disabled checkpoint-not-atomic

A mutant is *caught* when at least one of its tests fails, *survives* when they all pass. The exit status is 1 when a
mutant survives (or cannot be planted because the code it edits has changed: update its snippet). Not part of the
default suite (it runs the named tests once per mutant); when a new behaviour lands, add its bug here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from model_zoo_checks import tracked_files  # the same folder: what a clean checkout has

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what the planted bug does, in words
    path: str  # file to edit, relative to the bundle root
    old: str  # exact snippet, which must occur once
    new: str
    tests: tuple[str, ...]  # pytest node ids (relative to the bundle root) named for the behaviour


MUTANTS = [
    Mutant(
        "bias-correction-every-epoch",
        "the age-bias correction is refitted at every validation, not the best one",
        "scripts/calibration.py",
        "        if engine.state.best_metric_epoch != engine.state.epoch:\n            return\n",
        "",
        ("tests/test_resume.py::test_the_bias_correction_is_fitted_on_the_best_epoch_only",),
    ),
    Mutant(
        "evaluate-refits-correction",
        "evaluation refits the bias correction on the test rows it evaluates",
        "scripts/statistics.py",
        "    metrics = regression_metrics(predicted, age, correction)",
        "    correction = BiasCorrection.fit(predicted, age, 'beheshti')\n"
        "    metrics = regression_metrics(predicted, age, correction)",
        ("tests/test_inference.py::test_evaluate_overlay_writes_metrics_table_and_scatter",),
    ),
    Mutant(
        "inference-refits-correction",
        "inference fits the bias correction on the scans it predicts",
        "scripts/inference.py",
        "        correction = self.correction() if self.ready else None\n",
        "        known = [(a, it['age']) for it, a in zip(self.ready, ages.tolist()) if it.get('age') == it.get('age')]\n"
        "        correction = BiasCorrection.fit(*zip(*known)) if len(known) > 2 else None\n",
        ("tests/test_inference.py::test_datalist_slices_predicted_with_pad_and_corrected_pad",),
    ),
    Mutant(
        "checkpoint-not-atomic",
        "checkpoints are written straight to their target file",
        "scripts/checkpoint.py",
        "        path = write_atomic(self.dirname / (self.filename or filename), lambda tmp: torch.save(checkpoint, tmp))",
        "        path = self.dirname / (self.filename or filename)\n        torch.save(checkpoint, path)",
        (
            "tests/test_fault_tolerance.py::test_a_checkpoint_save_that_fails_half_way_leaves_the_previous_file_loadable",
        ),
    ),
    Mutant(
        "write-not-atomic",
        "every other output (CSV, JSON, slices, figures) is written straight to its target",
        "scripts/atomic.py",
        "        write(tmp)\n",
        "        write(path)\n        return path\n",
        (
            "tests/test_fault_tolerance.py::test_atomic_writes_keep_the_old_file_when_writing_fails_and_keep_the_extension",
        ),
    ),
    Mutant(
        "resume-disabled",
        "a rerun never loads last.pt: it trains from scratch",
        "configs/train.yaml",
        "  - $@checkpoint#loader.attach(@train#trainer) if os.path.exists(@resume_path) else None\n",
        "",
        ("tests/test_resume.py::test_a_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run",),
    ),
    Mutant(
        "resume-forgets-best-metric",
        "the evaluator's best score is not part of the resume state",
        "configs/train.yaml",
        "    best_metric: $scripts.resume.BestMetricState(@validate#evaluator)\n",
        "",
        ("tests/test_resume.py::test_a_resumed_run_keeps_the_best_model_when_it_scores_no_better",),
    ),
    Mutant(
        "resume-forgets-saver-record",
        "the best-model saver's record of the best score is not resumed",
        "configs/train.yaml",
        "    best_model_saver: '@validate#best_model_saver'\n",
        "",
        ("tests/test_resume.py::test_a_resumed_run_keeps_the_best_model_when_it_scores_no_better",),
    ),
    Mutant(
        "sampler-replays-epoch-0",
        "a resumed run's sampler starts again from epoch 0's shuffles",
        "configs/train.yaml",
        "    - _target_: scripts.resume.SamplerEpoch   # epoch e's shuffles in epoch e, resumed or not\n"
        "      sampler: '@train#sampler'\n",
        "",
        ("tests/test_resume.py::test_a_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run",),
    ),
    Mutant(
        "rng-not-resumed",
        "the random streams (noise, timesteps, dropout) restart on resume",
        "configs/train.yaml",
        "    random_state: $scripts.resume.RandomState()\n",
        "",
        ("tests/test_resume.py::test_a_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run",),
    ),
    Mutant(
        "ema-warmup-restarts",
        "the EMA momentum warm-up starts again on resume",
        "scripts/resume.py",
        '            scheduler.event_index = int(state["warmup_position"])',
        "            pass",
        ("tests/test_resume.py::test_a_killed_and_resumed_run_ends_exactly_as_the_uninterrupted_run",),
    ),
    Mutant(
        "cole-stops-training",
        "a cole fit on a model that ignores age raises inside the handler",
        "scripts/calibration.py",
        "        except ValueError as err:",
        "        except KeyError as err:",
        ("tests/test_resume.py::test_cole_on_a_model_that_ignores_age_is_refused_and_training_goes_on",),
    ),
    Mutant(
        "head-sees-unlabelled",
        "the age head runs on the whole batch (a BatchNorm leak) and is then masked",
        "scripts/networks.py",
        "self.age_head(z_sem[labelled])",
        "self.age_head(z_sem)[labelled]",
        ("tests/test_networks.py::test_training_outputs_run_the_head_on_labelled_images_only",),
    ),
    Mutant(
        "age-loss-imputes-unlabelled",
        "unlabelled images enter the age loss with the mean age as target",
        "scripts/losses.py",
        '        paired = ~torch.isnan(target["age"]) & ~torch.isnan(pred["age"])\n',
        '        target = {**target, "age": torch.nan_to_num(target["age"], nan=float(self.age_head.age_mean))}\n'
        '        paired = ~torch.isnan(pred["age"])\n',
        (
            "tests/test_engine.py::test_loss_is_noise_mse_plus_lambda_times_standardised_age_mse_on_labelled_only",
            "tests/test_engine.py::test_unlabelled_only_batch_sends_no_gradient_to_the_age_head",
            "tests/test_training.py::test_unlabelled_scans_train_the_diffusion_arm_only",
        ),
    ),
    Mutant(
        "checkpoint-holds-online-weights",
        "the best-model file holds the trained weights, not their EMA",
        "configs/train.yaml",
        "    save_dict: {model: '@eval_network'}",
        "    save_dict: {model: '@network'}",
        ("tests/test_training.py::test_validation_and_the_checkpoint_use_the_ema_weights",),
    ),
    Mutant(
        "encoder-in-bf16",
        "the encoder runs in the autocast dtype",
        "scripts/networks.py",
        "        with torch.autocast(x.device.type, enabled=False):\n"
        "            return self._features(x.to(torch.promote_types(x.dtype, torch.float32)))",
        "        return self._features(x).float()",
        ("tests/test_networks.py::test_bf16_autocast_does_not_move_the_predicted_age",),
    ),
    Mutant(
        "latent-not-standardised",
        "z_sem is the plain linear output (the paper's), by default",
        "scripts/networks.py",
        '        latent_norm: str = "batch",\n        latent_gain: float = 1.0,\n        head_norm: str = "none",',
        '        latent_norm: str = "none",\n        latent_gain: float = 1.0,\n        head_norm: str = "none",',
        ("tests/test_networks.py::test_z_sem_has_an_order_one_between_subject_scale_at_initialisation",),
    ),
    Mutant(
        "wrong-z-probe-keeps-own-z",
        "the decoder-uses-z probe swaps nothing",
        "scripts/handlers.py",
        "            wrong = z.roll(1, dims=0)",
        "            wrong = z",
        (
            "tests/test_engine.py::test_wrong_latent_penalty_is_zero_for_a_decoder_that_ignores_z_and_positive_when_it_uses_it",
        ),
    ),
    Mutant(
        "latent-statistics-from-labelled-only",
        "the latent's BatchNorm statistics come from labelled images only",
        "scripts/networks.py",
        "            _set_batchnorm_statistics(self.encoder.latent_norm, features)",
        "            _set_batchnorm_statistics(self.encoder.latent_norm, features[labelled])",
        ("tests/test_engine.py::test_batchnorm_recalibration_stores_the_exact_statistics_training_uses",),
    ),
    Mutant(
        "float32-override-ignored",
        "--autocast_dtype float32 falls back to bf16",
        "scripts/precision.py",
        "    if name in FULL_PRECISION:\n        return None",
        "    if name in FULL_PRECISION:\n" "        return default_autocast_dtype(device)",
        ("tests/test_inference.py::test_the_float32_override_reaches_inference_and_bf16_does_not_move_the_ages",),
    ),
    Mutant(
        "nan-loss-not-guarded",
        "a NaN loss is let through to backward and the optimizer",
        "scripts/handlers.py",
        "        if math.isfinite(loss):\n            return\n",
        "        return\n",
        ("tests/test_fault_tolerance.py::test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoints",),
    ),
    Mutant(
        "leakage-unchecked",
        "a subject in both training and test is accepted",
        "scripts/data.py",
        "    check_leakage: bool = True,",
        "    check_leakage: bool = False,",
        ("tests/test_fault_tolerance.py::test_bad_datalists_fail_with_one_line_naming_file_and_reason",),
    ),
    Mutant(
        "empty-slice-predicted",
        "an all-zero slice is predicted instead of reported",
        "scripts/slices.py",
        '    if data.max() <= 0:\n        raise ValueError("the slice is empty")\n',
        "",
        ("tests/test_inference.py::test_single_file_input_and_unusable_inputs",),
    ),
    Mutant(
        "leakage-per-scan-only",
        "leakage is checked per scan, so one participant's sessions can sit in training and test",
        "scripts/data.py",
        '    if item.get("participant_id"):\n        return str(item["participant_id"])\n',
        '    return str(item["subject"])\n',
        ("tests/test_bids.py::test_datalist_leakage_is_checked_per_participant",),
    ),
    Mutant(
        "bids-split-crosses-participants",
        "the seeded BIDS split shuffles scans, not participants",
        "scripts/bids.py",
        '        by_participant.setdefault(item.get("participant_id") or item["subject"], []).append(item)',
        '        by_participant.setdefault(item["subject"], []).append(item)',
        ("tests/test_bids.py::test_subject_level_split_is_deterministic_and_keeps_people_whole",),
    ),
    Mutant(
        "dicom-patient-tags-kept",
        "a DICOM scan's patient tags stay in the image's metadata",
        "scripts/dicom.py",
        '    return {k: v for k, v in meta.items() if not str(k).startswith("0010|")}',
        "    return dict(meta)",
        ("tests/test_dicom.py::test_the_t1_series_is_chosen_and_read_with_the_nifti_geometry",),
    ),
    Mutant(
        "shards-overlap",
        "shard i takes a contiguous block that overlaps the next one",
        "scripts/shards.py",
        "    mine = set(sorted({str(it[key]) for it in items})[shard.index :: shard.count])",
        "    keys = sorted({str(it[key]) for it in items})\n"
        "    mine = set(keys[shard.index * len(keys) // shard.count : (shard.index + 2) * len(keys) // shard.count])",
        ("tests/test_shards.py::test_shards_partition_the_inputs_deterministically",),
    ),
    Mutant(
        "merge-ignores-missing-shard",
        "merge joins whatever shards finished, even with one missing",
        "scripts/shards.py",
        "    if missing:\n",
        "    if False:\n",
        ("tests/test_shards.py::test_sharded_inference_merges_into_the_unsharded_predictions",),
    ),
    Mutant(
        "interval-fitted-on-predicted-data",
        "inference fits the prediction interval on the labelled scans it predicts",
        "scripts/inference.py",
        "        interval = self.interval() if self.ready else None\n",
        "        known = [(a, it['age']) for it, a in zip(self.ready, ages.tolist()) if it.get('age') == it.get('age')]\n"
        "        interval = PredictionInterval.fit(*zip(*known)) if len(known) > 2 else None\n",
        ("tests/test_intervals.py::test_training_fits_the_interval_on_the_calibration_split_and_inference_applies_it",),
    ),
    Mutant(
        "interval-unsigned-residuals",
        "the interval uses the 90th percentile of |residual| without the finite-sample rank",
        "scripts/calibration.py",
        "    k_high = int(np.ceil((n + 1) * (1 - alpha / 2)))",
        "    k_high = max(1, int(np.floor(n * (1 - alpha / 2))))",
        ("tests/test_intervals.py::test_interval_ranks_by_hand_and_bands_need_enough_scans",),
    ),
    Mutant(
        "interval-age-conditional-on-raw-pads",
        "the age-conditional interval's bands are fitted on raw PADs, so regression to the mean stays in them",
        "scripts/calibration.py",
        "[_split_conformal(correction.corrected_pad(pred[band == g], age[band == g]), coverage) for g in groups]",
        "[_split_conformal(pred[band == g] - age[band == g], coverage) for g in groups]",
        (
            "tests/test_intervals.py::"
            "test_the_age_conditional_interval_covers_each_age_third_where_the_marginal_one_misses_the_ends",
        ),
    ),
    Mutant(
        "levels-combined-by-mean",
        "several axial levels are combined by their mean, which one bad level can move, not the median",
        "scripts/inferers.py",
        '    return torch.quantile(ages.float(), 0.5, dim=1, keepdim=True, interpolation="midpoint")',
        "    return ages.float().mean(dim=1, keepdim=True)",
        ("tests/test_multislice.py::test_inferer_predicts_each_level_and_takes_the_median",),
    ),
    Mutant(
        "training-sees-the-medial-level-only",
        "training takes the centre level every time instead of drawing one per image",
        "configs/train.yaml",
        "  - {_target_: RandSpatialCropd, keys: image, roi_size: [-1, -1, 1], random_size: false}",
        "  - {_target_: CenterSpatialCropd, keys: image, roi_size: [-1, -1, 1]}",
        ("tests/test_multislice.py::test_training_samples_one_level_per_image",),
    ),
]


MUTANTS += [
    Mutant(
        "config-relative-to-working-dir",
        "inference.yaml takes a size from train.yaml by a %-macro, read relative to the working directory",
        "configs/inference.yaml",
        "image_size: 128\n",
        "image_size: '%configs/train.yaml::image_size'\n",
        ("tests/test_bundle.py::test_no_config_refers_to_the_working_directory",),
    ),
    Mutant(
        "import-from-above",
        "the engine reaches up into the analyses (an import cycle in the making)",
        "scripts/checkpoint.py",
        "from scripts.atomic import write_atomic\n",
        "from scripts.atomic import write_atomic\n        from scripts.statistics import pearson_r  # noqa: F401\n",
        ("tests/test_bundle.py::test_modules_import_only_from_the_layers_below_them",),
    ),
    Mutant(
        "inference-drifts-from-training",
        "inference.yaml's network differs from train.yaml's (a head size changed in one place only)",
        "configs/inference.yaml",
        "head_hidden_features: [128, 32]\n",
        "head_hidden_features: [128, 64]\n",
        ("tests/test_bundle.py::test_training_and_inference_configs_define_the_same_network_and_slice_loading",),
    ),
    Mutant(
        "evaluate-runs-training",
        "the evaluate overlay does not override `run`, so the Zoo-style command trains",
        "configs/evaluate.yaml",
        "evaluate: '@run'",
        "evaluate: '@training'",
        ("tests/test_bundle.py::test_every_run_id_the_readme_names_exists_and_run_matches_the_config",),
    ),
    Mutant(
        "imports-unsorted",
        "an import out of isort's order",
        "scripts/calibration.py",
        "import numpy as np\nimport torch\n",
        "import torch\nimport numpy as np\n",
        ("tests/test_code_style.py::test_isort",),
    ),
]


# The defects of issue 21 ("right answers on real cohorts"), each planted back.
MUTANTS += [
    Mutant(
        "bids-session-inherits-age",
        "a session without a usable sessions.tsv age takes the participants.tsv age",
        "scripts/bids.py",
        "        if key in dated or len(visits[pid]) > 1:\n",
        "        if False:\n",
        (
            "tests/test_bids.py::test_a_session_without_an_age_does_not_take_the_participants_age",
            "tests/test_bids.py::test_several_sessions_without_session_ages_have_no_age",
        ),
    ),
    Mutant(
        "bids-several-sessions-take-participant-age",
        "a participant with several sessions and no session ages gives every session the participants.tsv age",
        "scripts/bids.py",
        "        if key in dated or len(visits[pid]) > 1:\n",
        "        if key in dated:\n",
        ("tests/test_bids.py::test_several_sessions_without_session_ages_have_no_age",),
    ),
    Mutant(
        "bids-censored-age-read-as-text",
        "an age of 89+ is read as not a number instead of a censored age",
        "scripts/bids.py",
        "    if CENSORED_AGE.fullmatch(text):\n",
        "    if False:\n",
        ("tests/test_bids.py::test_a_censored_age_89_plus_is_no_age",),
    ),
    Mutant(
        "interval-on-the-selection-split",
        "the interval is fitted on the validation split that chose the checkpoint, not on the calibration split",
        "scripts/calibration.py",
        "            if self.data_loader is not None:\n",
        "            if False:\n",
        ("tests/test_intervals.py::test_training_fits_the_interval_on_the_calibration_split_and_inference_applies_it",),
    ),
    Mutant(
        "interval-one-band",
        "one interval for every scan, whatever its acquisition (no Mondrian bands)",
        "scripts/calibration.py",
        "                band = (distance > ATYPICAL).astype(int)\n",
        "                band = np.zeros(len(pred), dtype=int)\n",
        (
            "tests/test_intervals.py::"
            "test_acquisition_bands_keep_coverage_for_clinical_scans_and_research_widths_that_one_band_misses",
        ),
    ),
    Mutant(
        "atypicality-cjv-only",
        "typical and atypical acquisitions told apart by the CJV alone, which clinical and research scans share",
        "scripts/quality.py",
        "        offset = _log_metrics(metrics) - np.asarray(self.mean)\n",
        "        offset = (_log_metrics(metrics) - np.asarray(self.mean)) * np.array([1.0, 0.0, 0.0])\n",
        (
            "tests/test_intervals.py::"
            "test_acquisition_bands_keep_coverage_for_clinical_scans_and_research_widths_that_one_band_misses",
        ),
    ),
    Mutant(
        "calibration-not-checked",
        "inference applies whatever calibration lies beside the checkpoint",
        "configs/inference.yaml",
        "  - $scripts.inference.check_calibration(@ckpt_path, [@bias_correction_path, @interval_path], @slice_levels, "
        "@image_size)\n",
        "",
        ("tests/test_intervals.py::test_inference_refuses_a_calibration_fitted_for_another_model_or_level_count",),
    ),
    Mutant(
        "calibration-ignores-levels",
        "a calibration fitted for one axial level is applied to a median of several",
        "scripts/calibration.py",
        'CHECKED = ("weights_sha256", "slice_levels", "image_size")',
        'CHECKED = ("weights_sha256", "image_size")',
        (
            "tests/test_intervals.py::test_inference_refuses_a_calibration_fitted_for_another_model_or_level_count",
            "tests/test_intervals.py::test_a_calibration_records_what_it_was_fitted_for_and_refuses_anything_else",
        ),
    ),
    Mutant(
        "resume-with-other-settings",
        "a rerun with another max_epochs or learning rate resumes the old run",
        "configs/train.yaml",
        "    settings: $scripts.resume.RunSettings(@resume_settings, @resume_path)\n",
        "",
        ("tests/test_training.py::test_resuming_with_other_settings_is_refused_in_one_line",),
    ),
    Mutant(
        "dicom-lone-series-unchecked",
        "a folder's only series is used without checking it",
        "scripts/dicom.py",
        "        if problems := series[0].problems():",
        "        if problems := []:",
        ("tests/test_dicom.py::test_a_lone_series_that_is_not_t1w_3d_is_refused_with_the_reason",),
    ),
    Mutant(
        "dicom-slices-count-files",
        "a series' slices are counted as its files, so a one-file multi-frame volume is never 3D",
        "scripts/dicom.py",
        '                slices=sum(_frames(t["frames"]) for t in tags),',
        "                slices=len(files),",
        ("tests/test_dicom.py::test_an_enhanced_multiframe_series_counts_its_frames_and_is_read",),
    ),
    Mutant(
        "scan-id-is-the-file-name",
        "a folder input names each scan by its file name, so a/T1w and b/T1w collide",
        "scripts/inference.py",
        '        items = [{"image": str(p), "subject": datalists.subject_from_path(p.relative_to(path))} for p in files]',
        '        items = [{"image": str(p), "subject": datalists.subject_from_path(p.name)} for p in files]',
        ("tests/test_inference.py::test_scan_ids_are_unique_paths_and_no_output_leaves_the_output_folder",),
    ),
    Mutant(
        "output-name-unsanitised",
        "a scan id such as ../../x becomes a path outside the output folder",
        "scripts/inference.py",
        "    return folder / f\"{safe_name((item['split'] + '_' if item.get('split') else '') + item['subject'])}.npy\"",
        "    return folder / f\"{(item['split'] + '_' if item.get('split') else '') + item['subject']}.npy\"",
        ("tests/test_inference.py::test_scan_ids_are_unique_paths_and_no_output_leaves_the_output_folder",),
    ),
    Mutant(
        "hdbet2-unpickles",
        "HD-BET 2.x checkpoints are unpickled (weights_only=False)",
        "scripts/hdbet.py",
        '            checkpoint = torch.load(path, map_location="cpu", weights_only=True)',
        '            checkpoint = torch.load(path, map_location="cpu", weights_only=False)',
        (
            "tests/test_transforms.py::test_hdbet2_checkpoint_holding_a_pickled_object_is_refused_and_never_run",
            "tests/test_transforms.py::test_hdbet2_predictor_is_hdbets_with_the_weights_loaded_weights_only",
        ),
    ),
    Mutant(
        "hdbet2-pin-ignored",
        "a wrong pinned hdbet_weights_sha256 is not refused",
        "scripts/hdbet.py",
        "        if found != expected:",
        "        if False:",
        ("tests/test_transforms.py::test_hdbet2_wrong_pinned_digest_is_refused_before_loading",),
    ),
    Mutant(
        "regressor-batchnorm-shared-with-online-model",
        "the DenseNet baseline validates its EMA weights with the online model's BatchNorm statistics",
        "scripts/networks.py",
        "        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and "
        "m.track_running_stats]",
        "        norms = []",
        (
            "tests/test_baseline.py::test_precise_batchnorm_of_a_regressor_is_the_average_of_batch_statistics_for_its_own_weights",
            "tests/test_baseline.py::test_densenet_baseline_trains_and_evaluates_through_the_same_workflow",
        ),
    ),
    Mutant(
        "batchnorm-statistics-from-augmented-images",
        "the exact BatchNorm statistics are computed on augmented training images",
        "configs/train.yaml",
        "    dataset: '@train#batchnorm_dataset'",
        "    dataset: '@train#dataset'",
        ("tests/test_training.py::test_the_saved_batchnorm_statistics_are_exact_on_the_un_augmented_training_images",),
    ),
    Mutant(
        "rescans-cross-splits",
        "re-scans named sub-01_ses-1 and sub-01_ses-2 without participant_id may sit in training and test",
        "scripts/data.py",
        "    match = BIDS_SCAN_ID.fullmatch(subject)",
        "    match = None",
        ("tests/test_bids.py::test_datalist_leakage_is_checked_per_participant",),
    ),
    Mutant(
        "partial-field-of-view-predicted",
        "a scan that misses part of the brain in the slice is zero-filled and predicted",
        "scripts/transforms.py",
        "            if covered < self.min_brain_in_view:",
        "            if False:",
        ("tests/test_preprocess.py::test_outputs_manifest_and_datalist",),
    ),
    Mutant(
        "training-state-loaded-as-a-model",
        "the resumable last.pt is loaded as model weights (online weights with the EMA's statistics)",
        "scripts/checkpoint.py",
        '        isinstance(state.get(key), dict) for key in ("network", "model", "optimizer")\n',
        "        isinstance(state.get(key), dict) for key in ()\n",
        (
            "tests/test_inference.py::test_checkpoint_loading_is_weights_only",
            "tests/test_analysis.py::test_cli_bad_input_is_one_line_and_exit_2",
        ),
    ),
    Mutant(
        "empty-list-stops-inference",
        'a datalist with "disease": [] is refused as a whole',
        "scripts/inference.py",
        "            splits = [k for k, v in raw.items() if isinstance(v, list) and v]  # every list with items",
        "            splits = [k for k, v in raw.items() if isinstance(v, list)]",
        ("tests/test_inference.py::test_a_datalist_with_an_empty_list_is_predicted",),
    ),
    Mutant(
        "config-errors-as-tracebacks",
        "a bad datalist reaches the user as a RuntimeError traceback with the reason in its middle",
        "configs/train.yaml",
        "  - $scripts.cli.report_errors_in_one_line()   # a bad input or setting: one line, not a traceback\n"
        "  - $@checkpoint#loader.attach",
        "  - $@checkpoint#loader.attach",
        ("tests/test_training.py::test_a_bad_datalist_is_reported_in_one_line_on_the_command_line",),
    ),
    Mutant(
        "bf16-probe-misses-amx",
        "a CPU with AMX but no AVX512-BF16 is taken for one without native bf16",
        "scripts/precision.py",
        '        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")',
        '        checks = ("_is_avx512_bf16_supported",)',
        ("tests/test_engine.py::test_default_autocast_dtype_follows_native_bf16_support",),
    ),
    Mutant(
        "age-depends-on-batch",
        "evaluation runs whatever batch shape comes, so a scan's age depends on its batch",
        "scripts/inferers.py",
        "        if not size or network.training or inputs.shape[0] == size:",
        "        if True:",
        ("tests/test_inference.py::test_a_scans_age_does_not_depend_on_its_batch",),
    ),
    Mutant(
        "phantom-bids-t1w-4d",
        "the BIDS-mode phantom writes T1w images with a singleton 4th dimension",
        "scripts/phantom.py",
        "            singleton = False  # BIDS: a T1w image has exactly three dimensions\n",
        "",
        ("tests/test_bids.py::test_the_phantom_in_bids_mode_passes_the_bids_validator",),
    ),
    Mutant(
        "fast-path-keeps-anatomy-affine",
        "the fast path's registration leaves the affine part of the subject's anatomy in the slice",
        "scripts/phantom.py",
        "    error = np.linalg.inv(anatomy.affine_part()) @ _registration_error(rng, grade)",
        "    error = _registration_error(rng, grade)",
        ("tests/test_phantom.py::test_the_fast_path_reproduces_what_the_real_chain_makes_of_the_same_scans",),
    ),
    Mutant(
        "fast-path-without-n4",
        "the fast path skips N4, which the chain runs",
        "scripts/phantom.py",
        "    image = np.stack([n4_correct(plane, spacing) for plane in image])",
        "    image = np.asarray(image)",
        ("tests/test_phantom.py::test_the_fast_path_reproduces_what_the_real_chain_makes_of_the_same_scans",),
    ),
    Mutant(
        "fast-path-noise-per-call",
        "the noise is drawn per call, not per scanner voxel (levels of one scan disagree)",
        "scripts/phantom.py",
        "    real = image.astype(np.float32) + sigma * _voxel_normals(noise_seed, 2 * index)",
        "    real = image.astype(np.float32) + sigma * np.random.default_rng().standard_normal(index.shape)",
        ("tests/test_multislice.py::test_phantom_levels_keep_the_single_level_image_in_the_middle",),
    ),
    Mutant(
        "fast-path-own-noise",
        "the fast path draws a noise of its own, not the raw volume's (the same scan, two noise realisations)",
        "scripts/phantom.py",
        'image = _rician(image, self.grade.noise * TISSUE["wm"], acq.noise_seed, index)',
        'image = _rician(image, self.grade.noise * TISSUE["wm"], acq.noise_seed + 1, index)',
        ("tests/test_phantom.py::test_the_fast_path_reads_the_raw_volumes_own_voxels",),
    ),
    Mutant(
        "dicom-left-handed-written-as-is",
        "write_series writes a left-handed volume's frames as they are (an enhanced file then puts them a whole extent away)",
        "scripts/dicom.py",
        "    if np.linalg.det(direction) > 0:\n        return image",
        "    if True:\n        return image",
        ("tests/test_dicom.py::test_an_enhanced_multiframe_series_counts_its_frames_and_is_read",),
    ),
    Mutant(
        "hdbet-mask-unclosed",
        "the fast path's HD-BET mask keeps the notches its CSF-rim trimming cuts (no closing)",
        "scripts/phantom.py",
        "    return _closing(trimmed, HDBET_CLOSING_MM, spacing) & (brain > 0.5)",
        "    return trimmed",
        ("tests/test_phantom.py::test_the_emulated_hdbet_mask_bridges_narrow_notches_as_hdbet_does",),
    ),
    Mutant(
        "architecture-unchecked",
        "a checkpoint loads into a network of other architecture settings when every weight's shape fits",
        "scripts/networks.py",
        "    if differences:\n        raise ArchitectureMismatchError(",
        "    if False:\n        raise ArchitectureMismatchError(",
        ("tests/test_export.py::test_a_checkpoint_refuses_other_architecture_settings_naming_them",),
    ),
    Mutant(
        "foreach-ema-wrong-weight",
        "the foreach EMA weights the online model by 1 - momentum",
        "scripts/handlers.py",
        "        torch._foreach_lerp_(ema, online, momentum)",
        "        torch._foreach_lerp_(ema, online, 1.0 - momentum)",
        ("tests/test_engine.py::test_the_foreach_ema_averages_exactly_as_ignites_ema_handler",),
    ),
    Mutant(
        "augmentation-never-applied",
        "the training transforms leave out the augmentation block even when an augmentation is on",
        "configs/train.yaml",
        "(@augmentation if max(@augmentation_probs) > 0 else [])",
        "[]",
        ("tests/test_bundle.py::test_training_and_inference_configs_define_the_same_network_and_slice_loading",),
    ),
    Mutant(
        "report-registration-flag-inverted",
        "the report flags a good registration as doubtful and passes a doubtful one",
        "scripts/report.py",
        "    if correlation < DOUBTFUL_CORRELATION:",
        "    if correlation > DOUBTFUL_CORRELATION:",
        ("tests/test_report.py::test_the_report_flags_what_a_person_should_look_at",),
    ),
    Mutant(
        "report-drops-failure-reason",
        "the report marks a failed scan but does not say why",
        "scripts/report.py",
        '        flags += f\'<div class="reason">{html.escape(row["error"])}</div>\'',
        "        pass",
        (
            "tests/test_report.py::test_inference_writes_a_self_contained_report_of_every_scan",
            "tests/test_report.py::test_the_report_in_headless_chromium",
        ),
    ),
    Mutant(
        "report-links-a-stylesheet",
        "the report links a style sheet from a CDN (no longer opens offline)",
        "scripts/report.py",
        "<style>{STYLE}</style></head>",
        "<style>{STYLE}</style><link rel='stylesheet' href='https://cdn.example.org/table.css'></head>",
        ("tests/test_report.py::test_the_report_makes_no_network_request",),
    ),
    Mutant(
        "report-picture-not-inline",
        "the report links each scan's QC picture by path instead of inlining it (no longer opens from a USB stick)",
        "scripts/report.py",
        "    return _data_uri(buffer.getvalue())",
        "    return str(path) + '.png'",
        ("tests/test_report.py::test_the_report_in_headless_chromium",),
    ),
    Mutant(
        "interval-spread-off-by-one",
        "the stated coverage spread counts one residual rank too many inside the interval",
        "scripts/calibration.py",
        "stats.beta.ppf([tail, 1.0 - tail], k, n + 1 - k)",
        "stats.beta.ppf([tail, 1.0 - tail], k + 1, n - k)",
        ("tests/test_intervals.py::test_the_stated_coverage_spread_is_where_single_calibration_sets_land",),
    ),
    Mutant(
        "flag-read-raw",
        "training reads use_ema as given, so `--use_ema false` (the string 'false') keeps the EMA model",
        "configs/train.yaml",
        "eval_network: \"$@ema.ema_model if scripts.cli.flag(@use_ema, 'use_ema') else @network\"",
        'eval_network: "$@ema.ema_model if @use_ema else @network"',
        ("tests/test_bundle.py::test_every_on_off_setting_reads_false_from_the_command_line_as_off",),
    ),
    Mutant(
        "flag-accepts-any-word",
        "an on/off setting spelt wrongly is read as on instead of refused",
        "scripts/cli.py",
        '        raise BundleError(f"--{key} {value!r}: expected true or false")\n    return FLAG_WORDS[word]',
        "        return True\n    return FLAG_WORDS[word]",
        ("tests/test_bundle.py::test_every_on_off_setting_reads_false_from_the_command_line_as_off",),
    ),
]


def copy_bundle(destination: Path) -> None:
    """The tracked files (and untracked, not ignored ones) of the bundle: what a clean checkout has."""
    for name in tracked_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def plant(copy: Path, mutant: Mutant) -> None:
    path = copy / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise LookupError(f"{mutant.name}: the snippet to mutate occurs {count} times in {mutant.path}")
    path.write_text(text.replace(mutant.old, mutant.new))


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[bool, str]:
    """True when every named test passes (the mutant survives)."""
    env = dict(os.environ)
    validator = ROOT / ".venv" / "node" / "node_modules" / ".bin" / "bids-validator"  # install.sh's, not copied
    if validator.is_file():
        env.setdefault("BIDS_VALIDATOR", str(validator))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=", *tests],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode == 0, lines[-1] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run every mutant's tests on the unmutated copy first (they must pass)",
    )
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.bug}\n    {m.path}\n    " + "\n    ".join(m.tests))
        return 0

    survivors, broken = [], []
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_bundle(pristine)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            passed, last = run_tests(pristine, tests, args.timeout * 2)
            print(f"baseline ({len(tests)} tests on the unmutated bundle): {'pass' if passed else 'FAIL'}  {last}")
            if not passed:
                return 1
        for m in mutants:
            copy = Path(tmp) / m.name
            shutil.copytree(pristine, copy)
            start = time.perf_counter()
            try:
                plant(copy, m)
            except LookupError as err:
                broken.append(m.name)
                print(f"{m.name:38s} NOT PLANTED  {err}", flush=True)
                continue
            survived, last = run_tests(copy, m.tests, args.timeout)
            verdict = "SURVIVED" if survived else "caught"
            print(f"{m.name:38s} {verdict:9s} {time.perf_counter() - start:5.0f} s  {last}", flush=True)
            if survived:
                survivors.append(m.name)
            shutil.rmtree(copy, ignore_errors=True)
    print(
        f"\n{len(mutants) - len(survivors) - len(broken)} of {len(mutants)} planted bugs caught; "
        f"{len(survivors)} survived{': ' + ', '.join(survivors) if survivors else ''}"
        f"{'; not planted: ' + ', '.join(broken) if broken else ''}"
    )
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
