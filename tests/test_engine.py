"""Engine pieces: prepare-batch, inferer, semi-supervised loss, stock MONAI trainer/evaluator, sampler, DDIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MeanAbsoluteError, from_engine
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import DataLoader

from scripts.handlers import (
    GradientClipping,
    LossComponentsHandler,
    PreciseBatchNorm,
    WrongLatentPenalty,
    loss_log_transform,
    wrong_latent_penalty,
)
from scripts.inferers import AgeInferer, DiffusionAutoencoderInferer, unpack_age_output
from scripts.losses import SemiSupervisedLoss
from scripts.networks import DiffusionAutoencoder
from scripts.precision import default_autocast_dtype, resolve_autocast_dtype
from scripts.prepare_batch import AgePrepareBatch, DiffusionPrepareBatch
from scripts.samplers import LabelledRatioBatchSampler

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
    grads = {part: [p.grad for p in getattr(model, part).parameters()] for part in ("encoder", "unet", "age_head")}
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


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, None)]
)
def test_default_autocast_dtype_follows_native_bf16_support(monkeypatch, avx512_bf16, amx, expected):
    """bf16 where the CPU computes it natively (either instruction set), else full precision; whatever this CPU has."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert default_autocast_dtype("cpu") == expected
    assert resolve_autocast_dtype("auto", "cpu") == expected
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


@pytest.mark.parametrize("head_norm", ["none", "batch"])
def test_age_head_gradient_comes_from_labelled_items_only(head_norm):
    """The age loss reaches the head through the labelled rows alone: its gradient equals that of the head run on
    just those rows' z_sem. (z_sem itself is standardised over the whole batch, as every layer of the encoder,
    which the diffusion arm trains on every image, sees the whole batch.)"""
    ages = [50.0, NAN, 72.0, NAN, 64.0, NAN]
    mixed = batch(ages, seed=3)
    labelled_rows = [0, 2, 4]
    model = tiny_model().train().double()  # float64: the comparison below is to rounding error
    model.age_head = type(model.age_head)(
        TINY["z_dim"], TINY["head_hidden_features"], 0.0, 60.0, 10.0, head_norm
    ).double()
    mixed["image"] = mixed["image"].double()
    latents = []
    model.encoder.register_forward_hook(lambda *args: latents.append(args[2]))
    loss_mixed, grads_mixed = training_step_grads(model, mixed)
    assert total_abs(grads_mixed["age_head"]) > 0

    z = latents[-1].detach()[labelled_rows]
    model.zero_grad(set_to_none=True)
    error = (model.age_head(z) - torch.tensor([50.0, 72.0, 64.0], dtype=torch.float64)) / model.age_head.age_std
    (error**2).mean().backward()
    torch.testing.assert_close(loss_mixed.components["age"], (error**2).mean().detach(), rtol=1e-9, atol=0)
    for p, g_mixed in zip(model.age_head.parameters(), grads_mixed["age_head"]):
        torch.testing.assert_close(g_mixed, p.grad, atol=1e-12, rtol=1e-9)


def test_lambda_zero_leaves_the_age_head_without_gradient_signal():
    model = tiny_model().train()
    _, grads = training_step_grads(model, batch([50.0, 60.0, NAN]), lambda_age=0.0)
    assert all(g is None or not g.any() for g in grads["age_head"])


def test_a_lone_labelled_image_in_a_training_batch_is_skipped_by_a_batchnorm_head_not_nan():
    model = tiny_model().train()
    model.age_head = type(model.age_head)(TINY["z_dim"], TINY["head_hidden_features"], 0.0, 60.0, 10.0, "batch")
    with pytest.warns(UserWarning, match="single labelled"):
        loss_fn, grads = training_step_grads(model, batch([50.0, NAN, NAN]))
    assert float(loss_fn.components["age"]) == 0.0 and int(loss_fn.components["labelled"]) == 0
    assert all(g is None for g in grads["age_head"])
    assert all(torch.isfinite(g).all() for g in grads["unet"] + grads["encoder"])
    # the default head (no BatchNorm) learns from it
    loss_fn, grads = training_step_grads(tiny_model().train(), batch([50.0, NAN, NAN]))
    assert int(loss_fn.components["labelled"]) == 1 and total_abs(grads["age_head"]) > 0


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
    data = list(dataset(12, labelled_every=1))
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=5),
        network=model,
        prepare_batch=AgePrepareBatch(),
        inferer=AgeInferer(),
        key_val_metric={"val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        postprocessing=unpack_age_output,
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
    few_labelled = LabelledRatioBatchSampler(np.arange(12) == 0, batch_size=4, labelled_ratio=0.5)
    assert all(sum(i == 0 for i in b) == 1 for b in few_labelled)  # the only label, once per batch
    with pytest.raises(ValueError):
        LabelledRatioBatchSampler(np.ones(3, dtype=bool), batch_size=4)
    with pytest.raises(ValueError):
        LabelledRatioBatchSampler(np.ones(8, dtype=bool), batch_size=4, labelled_ratio=1.5)


# ----------------------------------------------------------------------------------------------- BatchNorm statistics


def test_batchnorm_recalibration_stores_the_exact_statistics_training_uses():
    """The latent's standardisation gets the statistics of every training image, the head's BatchNorm those of the
    labelled ones (after the standardisation, with dropout off): what evaluation will then see."""
    model = tiny_model()
    model.age_head = type(model.age_head)(TINY["z_dim"], TINY["head_hidden_features"], 0.5, 60.0, 10.0, "batch")
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ages = torch.tensor([50.0, NAN, 61.0, 70.0, NAN, 33.0, 45.0, NAN, 80.0, 58.0])
    loader = [{"image": images[:6], "age": ages[:6]}, {"image": images[6:], "age": ages[6:]}]
    model.train()
    for _ in range(3):  # running statistics drift away from what evaluation will see
        model.age_head(model.encode(torch.rand(4, 1, 16, 16)))
    PreciseBatchNorm(model, loader)()
    assert model.training  # mode restored
    latent_bn, head_bn = model.encoder.latent_norm, model.age_head.mlp[2]
    assert head_bn.momentum == 0.1  # momentum untouched for further training
    labelled = ~torch.isnan(ages)
    with torch.no_grad():
        features = model.encoder.features(images)
        torch.testing.assert_close(latent_bn.running_mean, features.mean(0))
        torch.testing.assert_close(latent_bn.running_var, features.var(0, unbiased=True))
        model.eval()
        hidden = model.age_head.mlp[1](model.age_head.mlp[0](model.encode(images[labelled])))  # Linear -> ReLU
    torch.testing.assert_close(head_bn.running_mean, hidden.mean(0))
    torch.testing.assert_close(head_bn.running_var, hidden.var(0, unbiased=True))
    # evaluation now standardises z_sem over the training images: mean 0, sd 1 per dimension (up to BatchNorm's
    # eps, which matters for this tiny random model's nearly constant features)
    with torch.no_grad():
        z = model.encode(images)
    torch.testing.assert_close(z.mean(0), torch.zeros(TINY["z_dim"]), atol=1e-5, rtol=0)
    variance = latent_bn.running_var
    torch.testing.assert_close(z.std(0), (variance / (variance + latent_bn.eps)).sqrt(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("buffers", ["copy", "update"])
def test_the_foreach_ema_averages_exactly_as_ignites_ema_handler(buffers):
    """ForeachEMAHandler (one foreach lerp over every parameter) against ignite's EMAHandler (two ops per parameter),
    warm-up schedule included, over steps that change every parameter and the BatchNorm statistics."""
    from ignite.engine import Engine
    from ignite.handlers import EMAHandler

    from scripts.handlers import ForeachEMAHandler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    handlers = [
        kind(model, momentum=0.05, momentum_warmup=0.5, warmup_iters=3, handle_buffers=buffers)
        for kind in (EMAHandler, ForeachEMAHandler)
    ]

    def step(engine, batch):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(6, 4))  # train mode: the running statistics move

    engine = Engine(step)
    for handler in handlers:
        handler.attach(engine, name=f"momentum_{type(handler).__name__}")
    engine.run(range(6), max_epochs=1)
    stock, foreach = (h.ema_model.state_dict() for h in handlers)
    for key in stock:
        torch.testing.assert_close(foreach[key], stock[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(foreach["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy


def test_gradient_clipping_caps_the_norm_between_backward_and_step():
    model = tiny_model()
    data = [batch([50.0, NAN, 70.0, 64.0], seed=s) for s in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_function=SemiSupervisedLoss(model.age_head),
        inferer=DiffusionAutoencoderInferer(DDPMScheduler(1000)),
        prepare_batch=DiffusionPrepareBatch(),
        train_handlers=[GradientClipping(max_norm=0.01)],
        decollate=False,
    )
    norms_at_step = []
    trainer.add_event_handler(
        IterationEvents.MODEL_COMPLETED,
        lambda engine: norms_at_step.append(
            float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        ),
    )
    trainer.run()
    assert float(trainer.state.output["grad_norm"]) > 0.01  # the norm before clipping is logged
    assert all(norm == pytest.approx(0.01, rel=1e-4) for norm in norms_at_step)  # what the optimizer saw
    assert GradientClipping(max_norm=0).max_norm == 0  # 0 / None: not attached, gradients untouched
    unclipped = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data[:1],
        network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_function=SemiSupervisedLoss(model.age_head),
        inferer=DiffusionAutoencoderInferer(DDPMScheduler(1000)),
        prepare_batch=DiffusionPrepareBatch(),
        train_handlers=[GradientClipping(max_norm=0)],
        decollate=False,
    )
    unclipped.run()
    assert "grad_norm" not in unclipped.state.output


class LatentOracle(torch.nn.Module):
    """A decoder that reads x0 from z (z is x0, flattened) and so predicts the noise almost exactly."""

    def __init__(self, scheduler):
        super().__init__()
        self.alphas = scheduler.alphas_cumprod
        self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the wrapper a device

    def encode(self, x0):
        return x0.flatten(1)

    def denoise(self, x_t, t, z):
        alpha = self.alphas[t][:, None, None, None]
        return 0.9 * (x_t - alpha.sqrt() * z.view_as(x_t)) / (1 - alpha).sqrt()


def test_wrong_latent_penalty_is_zero_for_a_decoder_that_ignores_z_and_positive_when_it_uses_it():
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    scheduler = DDPMScheduler(1000)
    ignores = DiffusionAutoencoder(**TINY)  # zero-initialised output: eps_hat = 0 whatever z
    result = wrong_latent_penalty(ignores, images, scheduler, timestep=300)
    assert result["penalty"] == 0.0 and result["mse_own"] == pytest.approx(result["mse_wrong"])
    oracle = LatentOracle(scheduler)
    uses = wrong_latent_penalty(oracle, images, scheduler, timestep=300)
    assert uses["mse_own"] == pytest.approx(0.01, rel=0.1)  # (1 - 0.9)^2 of unit-variance noise
    assert uses["penalty"] > 5.0
    assert uses["penalty"] == pytest.approx(uses["mse_wrong"] / uses["mse_own"] - 1)
    assert wrong_latent_penalty(oracle, images, scheduler, timestep=300) == uses  # fixed noise: reproducible
    with pytest.raises(ValueError, match="at least 2"):
        wrong_latent_penalty(oracle, images[:1], scheduler)


def test_wrong_latent_penalty_handler_logs_a_validation_metric():
    model = tiny_model().eval()
    data = [batch([50.0, 60.0, 70.0], seed=s) for s in range(3)]
    probe = WrongLatentPenalty(DDPMScheduler(1000), timestep=300, num_images=5)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=model,
        inferer=AgeInferer(),
        prepare_batch=AgePrepareBatch(),
        key_val_metric={"val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[probe],
        postprocessing=unpack_age_output,
        decollate=False,
    )
    evaluator.run()
    images = torch.cat([d["image"] for d in data])[:5]  # the first num_images the evaluator saw
    expected = wrong_latent_penalty(model, images, DDPMScheduler(1000), timestep=300)["penalty"]
    assert evaluator.state.metrics["val_wrong_z_penalty"] == pytest.approx(expected)


def test_autocast_setting_resolves_strings_for_the_command_line():
    native = default_autocast_dtype("cpu")
    assert resolve_autocast_dtype("auto", "cpu") == native
    for full in ("float32", "fp32", "none", "None", "null", "off", None):
        assert resolve_autocast_dtype(full, "cpu") is None
    assert resolve_autocast_dtype("bf16", "cpu") == "bfloat16"
    assert resolve_autocast_dtype(torch.bfloat16, "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="autocast_dtype"):
        resolve_autocast_dtype("int8", "cpu")
