"""Engine pieces: prepare-batch, inferer, semi-supervised loss, stock MONAI trainer/evaluator, sampler, DDIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanAbsoluteError, from_engine
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from scripts.engine import (
    AgeInferer,
    BatchNormRecalibration,
    AgePrepareBatch,
    DiffusionAutoencoderInferer,
    DiffusionPrepareBatch,
    LabelledRatioBatchSampler,
    LossComponentsHandler,
    SemiSupervisedLoss,
    ddim_decode,
    ddim_encode,
    ddim_scheduler,
    default_autocast_dtype,
    loss_log_transform,
)
from scripts.networks import DiffusionAutoencoder

TINY = dict(
    base_channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    encoder_num_res_blocks=1,
    attention_resolutions=(8,),
    image_size=16,
    embed_dim=32,
    z_dim=16,
    dropout=0.0,
    head_hidden_features=(8, 4),
    head_dropout=0.0,
    age_mean=60.0,
    age_std=10.0,
)
NAN = float("nan")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy CPU every op would wait for both to be scheduled."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> DiffusionAutoencoder:
    """Tiny model whose zero-initialised layers are randomised, so every part receives gradient from step one."""
    torch.manual_seed(seed)
    model = DiffusionAutoencoder(**TINY)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not weight.any():
                weight.normal_(0.0, 0.05)
    return model


def batch(ages: list[float], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(len(ages), 1, 16, 16, generator=generator), "age": torch.tensor(ages)}


def training_step_grads(model, batchdata, lambda_age=1.0, seed=0):
    """prepare_batch + inferer + loss + backward, as SupervisedTrainer does; returns (loss_fn, grads by part)."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    inputs, targets, args, kwargs = DiffusionPrepareBatch()(batchdata)
    pred = DiffusionAutoencoderInferer(DDPMScheduler(1000))(inputs, model, *args, **kwargs)
    loss_fn = SemiSupervisedLoss(model.age_head, lambda_age)
    loss_fn(pred, targets).backward()
    grads = {
        part: [p.grad for p in getattr(model, part).parameters()] for part in ("encoder", "unet", "age_head")
    }
    return loss_fn, grads


def total_abs(grads) -> float:
    return sum(float(g.abs().sum()) for g in grads if g is not None)


# ---------------------------------------------------------------------------------------------------- prepare batch


def test_prepare_batch_draws_noise_and_timesteps_and_keeps_nan_ages():
    data = batch([55.0, NAN, 70.0])
    data["image"] = MetaTensor(data["image"])
    torch.manual_seed(0)
    inputs, targets, args, kwargs = DiffusionPrepareBatch(num_train_timesteps=1000)(data)
    assert type(inputs) is torch.Tensor  # MetaTensor bookkeeping dropped before the network
    assert args == ()
    assert set(kwargs) == {"noise", "timesteps", "labelled"}
    assert kwargs["noise"] is targets["noise"] and targets["noise"].shape == inputs.shape
    assert kwargs["timesteps"].dtype == torch.long and kwargs["timesteps"].shape == (3,)
    assert kwargs["labelled"].tolist() == [True, False, True]
    assert targets["age"].dtype == torch.float32 and torch.isnan(targets["age"]).tolist() == [False, True, False]

    many = DiffusionPrepareBatch(num_train_timesteps=50)({"image": torch.zeros(4000, 1, 1, 1)})[3]["timesteps"]
    assert many.min() == 0 and many.max() == 49 and abs(many.float().mean().item() - 24.5) < 1.5


def test_prepare_batch_without_age_key_is_unlabelled():
    _, targets, _, kwargs = DiffusionPrepareBatch()({"image": torch.rand(2, 1, 16, 16)})
    assert torch.isnan(targets["age"]).all() and not kwargs["labelled"].any()


def test_eval_prepare_batch_gives_column_of_ages():
    images, ages = AgePrepareBatch()(batch([50.0, 60.0]))
    assert images.shape == (2, 1, 16, 16) and ages.shape == (2, 1) and ages.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------- inferer


def test_inferer_noises_x0_and_uses_one_encoder_pass_for_both_outputs():
    model = tiny_model().eval()
    scheduler = DDPMScheduler(1000)
    data = batch([50.0, NAN, 70.0])
    torch.manual_seed(0)
    inputs, _, args, kwargs = DiffusionPrepareBatch()(data)

    encoder_calls = []
    model.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    seen_by_unet = []
    model.unet.register_forward_pre_hook(lambda _, a: seen_by_unet.append(a))
    with torch.no_grad():
        pred = DiffusionAutoencoderInferer(scheduler)(inputs, model, *args, **kwargs)
    assert len(encoder_calls) == 1

    x_t, t, z = seen_by_unet[0]
    torch.testing.assert_close(x_t, scheduler.add_noise(inputs, kwargs["noise"], kwargs["timesteps"]))
    assert torch.equal(t, kwargs["timesteps"])
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(inputs))
        torch.testing.assert_close(pred["eps"], model.denoise(x_t, t, z))
        expected_age = model.predict_age(inputs)
    assert torch.isnan(pred["age"]).tolist() == [False, True, False]
    torch.testing.assert_close(pred["age"][[0, 2]], expected_age[[0, 2]])


def test_default_autocast_dtype_follows_native_bf16_support():
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert default_autocast_dtype("cpu") == ("bfloat16" if native else None)
    assert default_autocast_dtype(torch.device("meta")) is None


def test_inferer_under_bf16_autocast_gives_float32_ages_and_a_finite_loss():
    model = tiny_model()
    torch.manual_seed(0)
    inputs, targets, args, kwargs = DiffusionPrepareBatch()(batch([50.0, 62.0, NAN, 70.0]))
    pred = DiffusionAutoencoderInferer(DDPMScheduler(1000), autocast_dtype="bfloat16")(inputs, model, **kwargs)
    assert pred["eps"].dtype == torch.bfloat16 and pred["age"].dtype == torch.float32
    loss = SemiSupervisedLoss(model.age_head)(pred, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------------------- loss


def test_loss_is_noise_mse_plus_lambda_times_standardised_age_mse_on_labelled_only():
    pred = {"eps": torch.tensor([[1.0, 2.0]]).expand(4, 2), "age": torch.tensor([62.0, 70.0, 40.0, NAN])}
    # item 1: unlabelled (NaN target) -> no age term; item 3: labelled but not predicted (a lone labelled
    # image in a training batch) -> no age term either, rather than a NaN loss
    target = {"noise": torch.zeros(4, 2), "age": torch.tensor([60.0, NAN, 50.0, 80.0])}
    model = DiffusionAutoencoder(**TINY)  # age_std = 10
    loss_fn = SemiSupervisedLoss(model.age_head, lambda_age=0.5)
    loss = loss_fn(pred, target)
    noise = (1 + 4) / 2
    age = ((0.2**2) + (1.0**2)) / 2
    torch.testing.assert_close(loss, torch.tensor(noise + 0.5 * age))
    torch.testing.assert_close(loss_fn.components["noise"], torch.tensor(noise))
    torch.testing.assert_close(loss_fn.components["age"], torch.tensor(age))
    assert int(loss_fn.components["labelled"]) == 2
    model.age_head.set_age_stats(0.0, 20.0)  # statistics are read at call time
    torch.testing.assert_close(loss_fn(pred, target), torch.tensor(noise + 0.5 * age / 4))


def test_unlabelled_only_batch_sends_no_gradient_to_the_age_head():
    model = tiny_model().train()
    loss_fn, grads = training_step_grads(model, batch([NAN, NAN, NAN, NAN]))
    assert float(loss_fn.components["age"]) == 0.0
    assert all(g is None or not g.any() for g in grads["age_head"])
    assert total_abs(grads["unet"]) > 0 and total_abs(grads["encoder"]) > 0
    assert all(g is not None for g in grads["encoder"])


def test_age_head_gradient_comes_from_labelled_items_only():
    ages = [50.0, NAN, 72.0, NAN, 64.0, NAN]
    mixed = batch(ages, seed=3)
    labelled_rows = [0, 2, 4]
    labelled_only = {"image": mixed["image"][labelled_rows], "age": mixed["age"][labelled_rows]}

    # float64: in float32 the convolutions' algorithm (hence rounding) depends on the batch size
    model = tiny_model().train().double()
    mixed["image"], labelled_only["image"] = mixed["image"].double(), labelled_only["image"].double()
    loss_mixed, grads_mixed = training_step_grads(model, mixed)
    loss_labelled, grads_labelled = training_step_grads(model, labelled_only)

    torch.testing.assert_close(loss_mixed.components["age"], loss_labelled.components["age"])
    assert total_abs(grads_mixed["age_head"]) > 0
    for g_mixed, g_labelled in zip(grads_mixed["age_head"], grads_labelled["age_head"]):
        torch.testing.assert_close(g_mixed, g_labelled, atol=1e-12, rtol=1e-9)


def test_lambda_zero_leaves_the_age_head_without_gradient_signal():
    model = tiny_model().train()
    _, grads = training_step_grads(model, batch([50.0, 60.0, NAN]), lambda_age=0.0)
    assert all(g is None or not g.any() for g in grads["age_head"])


def test_a_lone_labelled_image_in_a_training_batch_is_skipped_not_nan():
    model = tiny_model().train()
    with pytest.warns(UserWarning, match="single labelled"):
        loss_fn, grads = training_step_grads(model, batch([50.0, NAN, NAN]))
    assert float(loss_fn.components["age"]) == 0.0 and int(loss_fn.components["labelled"]) == 0
    assert all(g is None for g in grads["age_head"])
    assert all(torch.isfinite(g).all() for g in grads["unet"] + grads["encoder"])


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_inferer_trains_a_distributed_data_parallel_model_through_forward(tmp_path):
    """The inferer calls the wrapper's forward, so DDP sees the pass; grads equal the unwrapped model's."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        data = batch([50.0, NAN, 72.0, 64.0])
        model = tiny_model()
        _, expected = training_step_grads(model, data)
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model(), find_unused_parameters=True)
        torch.manual_seed(0)
        inputs, targets, args, kwargs = DiffusionPrepareBatch()(data)
        pred = DiffusionAutoencoderInferer(DDPMScheduler(1000))(inputs, ddp, *args, **kwargs)
        SemiSupervisedLoss(ddp.module.age_head)(pred, targets).backward()
        for ours, reference in zip(ddp.module.parameters(), model.parameters()):
            torch.testing.assert_close(ours.grad, reference.grad)
        sampler = LabelledRatioBatchSampler(np.ones(8, dtype=bool), batch_size=2)
        assert (sampler.num_replicas, sampler.rank) == (1, 0)  # read from the process group
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------- stock MONAI workflows


def dataset(n: int, labelled_every: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        age = 40.0 + 40.0 * i / n
        # brightness encodes age, so the encoder has something to find
        image = torch.rand(1, 16, 16, generator=generator) * 0.3 + (age - 40.0) / 60.0
        items.append({"image": image, "age": age if i % labelled_every == 0 else NAN})
    return items


def test_supervised_trainer_loss_falls_and_logs_both_terms():
    torch.manual_seed(0)
    model = tiny_model()
    data = dataset(16, labelled_every=2)
    sampler = LabelledRatioBatchSampler([not math.isnan(d["age"]) for d in data], batch_size=8, labelled_ratio=0.5)
    loss_fn = SemiSupervisedLoss(model.age_head, lambda_age=1.0)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=20,
        train_data_loader=DataLoader(data, batch_sampler=sampler),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 3e-3),
        loss_function=loss_fn,
        prepare_batch=DiffusionPrepareBatch(),
        inferer=DiffusionAutoencoderInferer(DDPMScheduler(1000)),
        train_handlers=[LossComponentsHandler(loss_fn)],
    )
    logged = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(loss_log_transform(e.state.output)))
    trainer.run()

    assert len(logged) == 40
    for entry in logged:
        assert entry["loss"] == pytest.approx(entry["loss_noise"] + entry["loss_age"], rel=1e-5)
    for term, factor in (("loss", 0.7), ("loss_noise", 0.5), ("loss_age", 0.8)):
        first = np.mean([entry[term] for entry in logged[:8]])
        last = np.mean([entry[term] for entry in logged[-8:]])
        assert last < factor * first, (term, first, last)


def test_supervised_evaluator_gives_ages_in_years_for_mae():
    model = tiny_model()
    data = [d for d in dataset(12, labelled_every=1)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=5),
        network=model,
        prepare_batch=AgePrepareBatch(),
        inferer=AgeInferer(),
        key_val_metric={"val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        decollate=False,
    )
    evaluator.run()
    mae = evaluator.state.metrics["val_mae"]
    with torch.no_grad():
        model.eval()
        images = torch.stack([d["image"] for d in data])
        ages = torch.tensor([d["age"] for d in data])
        expected = (model.predict_age(images) - ages).abs().mean().item()
    assert mae == pytest.approx(expected, rel=1e-5)
    assert evaluator.state.output["pred"].shape == (2, 1)  # last batch of 12 in fives


# ---------------------------------------------------------------------------------------------------------- sampler


def test_sampler_puts_the_requested_share_of_labelled_items_in_every_batch():
    labelled = np.zeros(100, dtype=bool)
    labelled[::10] = True  # 10 % labelled
    sampler = LabelledRatioBatchSampler(labelled, batch_size=8, labelled_ratio=0.3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 100 // 8
    assert all(len(b) == 8 and len(set(b)) == 8 for b in batches)
    assert all(sum(labelled[b]) == math.ceil(0.3 * 8) for b in batches)
    unlabelled_seen = [i for b in batches for i in b if not labelled[i]]
    assert len(unlabelled_seen) == len(set(unlabelled_seen))  # unlabelled pool not repeated within an epoch


def test_sampler_is_deterministic_by_seed_and_reshuffles_each_epoch():
    labelled = np.arange(40) % 3 == 0
    first = LabelledRatioBatchSampler(labelled, batch_size=8, seed=7)
    second = LabelledRatioBatchSampler(labelled, batch_size=8, seed=7)
    epoch0, epoch1 = list(first), list(first)  # each pass advances the epoch
    assert epoch0 == list(second)
    assert epoch0 != epoch1
    second.set_epoch(1)
    assert list(second) == epoch1
    assert list(LabelledRatioBatchSampler(labelled, batch_size=8, seed=8)) != epoch0


def test_sampler_shards_disjoint_equal_batches_across_ranks():
    labelled = np.arange(103) % 4 == 0
    shards = [
        LabelledRatioBatchSampler(labelled, batch_size=5, labelled_ratio=0.4, seed=3, num_replicas=3, rank=r)
        for r in range(3)
    ]
    for shard in shards:
        shard.set_epoch(2)
    per_rank = [list(shard) for shard in shards]
    assert len({len(batches) for batches in per_rank}) == 1 and len(per_rank[0]) == len(shards[0]) == 103 // 5 // 3
    unlabelled = [i for batches in per_rank for b in batches for i in b if not labelled[i]]
    assert len(unlabelled) == len(set(unlabelled))  # no unlabelled item on two ranks
    batch_sets = [frozenset(b) for batches in per_rank for b in batches]
    assert len(set(batch_sets)) == len(batch_sets)
    assert all(sum(labelled[b]) == 2 for batches in per_rank for b in batches)


def test_sampler_falls_back_when_one_pool_is_empty():
    all_labelled = LabelledRatioBatchSampler(np.ones(10, dtype=bool), batch_size=4, labelled_ratio=0.25)
    assert [len(b) for b in all_labelled] == [4, 4]
    none_labelled = LabelledRatioBatchSampler(np.zeros(10, dtype=bool), batch_size=4, labelled_ratio=0.5)
    batches = list(none_labelled)
    assert [len(b) for b in batches] == [4, 4] and len({i for b in batches for i in b}) == 8
    with pytest.warns(UserWarning, match="1 labelled item per batch"):
        few_labelled = LabelledRatioBatchSampler(np.arange(12) == 0, batch_size=4, labelled_ratio=0.5)
    assert all(sum(i == 0 for i in b) == 1 for b in few_labelled)  # the only label, once per batch
    with pytest.raises(ValueError):
        LabelledRatioBatchSampler(np.ones(3, dtype=bool), batch_size=4)
    with pytest.raises(ValueError):
        LabelledRatioBatchSampler(np.ones(8, dtype=bool), batch_size=4, labelled_ratio=1.5)


# ------------------------------------------------------------------------------------------------------------- DDIM


class TimeOnlyNoise(torch.nn.Module):
    """eps(x_t, t, z) that ignores x_t: DDIM inversion is then exact, which checks the timestep bookkeeping."""

    def denoise(self, x_t, t, z):
        t = t.float()[:, None, None, None]
        wave = torch.linspace(-1.0, 1.0, x_t.shape[-1])
        eps = torch.sin(t / 37.0) * z.mean(1)[:, None, None, None] + torch.cos(t / 100.0) * wave
        return eps.expand_as(x_t)


def test_ddim_scheduler_steps_are_consistent_both_ways():
    scheduler = ddim_scheduler(10)
    assert scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert not scheduler.clip_sample
    with pytest.raises(ValueError):
        ddim_scheduler(7)


@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_ddim_round_trip_is_exact_when_eps_ignores_x_t(num_steps):
    scheduler = ddim_scheduler(num_steps)
    x0 = torch.rand(2, 1, 16, 16)
    z = torch.randn(2, 16)
    x_T = ddim_encode(TimeOnlyNoise(), x0, z, scheduler)
    assert x_T.std() > 0.3  # really noised, not a copy of x0
    torch.testing.assert_close(ddim_decode(TimeOnlyNoise(), x_T, z, scheduler), x0, atol=2e-4, rtol=0)


def test_ddim_with_the_untrained_unet_is_an_exact_scaling_and_deterministic():
    torch.manual_seed(0)
    model = DiffusionAutoencoder(**TINY).eval()  # zero-initialised output: eps_hat = 0
    scheduler = ddim_scheduler(20)
    x0 = torch.rand(2, 1, 16, 16)
    z = model.encode(x0)
    x_T = ddim_encode(model, x0, z, scheduler)
    torch.testing.assert_close(x_T, scheduler.alphas_cumprod[999].sqrt() * x0)
    torch.testing.assert_close(ddim_decode(model, x_T, z, scheduler), x0, atol=1e-5, rtol=1e-5)

    trained_like = tiny_model().eval()
    z = trained_like.encode(x0)
    first = ddim_encode(trained_like, x0, z, scheduler)
    assert torch.equal(first, ddim_encode(trained_like, x0, z, scheduler))
    assert torch.equal(ddim_decode(trained_like, first, z, scheduler), ddim_decode(trained_like, first, z, scheduler))


# ----------------------------------------------------------------------------------------------- BatchNorm statistics


def test_batchnorm_recalibration_stores_the_exact_statistics_of_the_labelled_images():
    model = tiny_model()
    model.age_head.mlp[3].p = 0.5  # dropout on, as in training: the recalibration must switch it off
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    loader = [{"image": images[:6]}, {"image": images[6:]}]
    model.train()
    for _ in range(3):  # running statistics drift away from what evaluation will see
        model.age_head(model.encode(torch.rand(4, 1, 16, 16)))
    BatchNormRecalibration(model, loader)()
    assert model.training  # mode restored
    first_bn = model.age_head.mlp[2]
    assert first_bn.momentum == 0.1  # momentum restored for further training
    with torch.no_grad():
        features = model.age_head.mlp[1](model.age_head.mlp[0](model.encode(images)))  # Linear -> ReLU
    torch.testing.assert_close(first_bn.running_mean, features.mean(0))
    torch.testing.assert_close(first_bn.running_var, features.var(0, unbiased=True))
    # Evaluation now reproduces the batch-statistics output of the whole labelled set (up to BatchNorm's
    # unbiased running variance against the biased batch variance, a factor 10/9 here).
    model.eval()
    with torch.no_grad():
        evaluated = model.predict_age(images)
        head = model.age_head
        head.mlp[2].train(), head.mlp[6].train()
        batch_stats = head(model.encode(images))
    torch.testing.assert_close(evaluated, batch_stats, rtol=0.03, atol=0.0)

