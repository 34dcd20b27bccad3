"""The parts of the training loop: schedules, EMA, the epoch sampler, the non-finite step guard, checkpoints."""

import copy
import json
import math
import warnings

import pytest
import torch
from conftest import TINY
from torch import nn

from detrkit.data.sampler import EpochSampler, SeededSamples
from detrkit.engine.checkpoint import latest_checkpoint, load_state, save_step_checkpoint
from detrkit.engine.config import TrainConfig
from detrkit.engine.ema import ModelEMA
from detrkit.engine.schedule import LRSchedule
from detrkit.engine.train import Trainer, TrainingError, adamw
from detrkit.weights.files import step_checkpoints


def test_schedules_warmup_step_multistep_cosine_flat_cosine():
    step = LRSchedule("step", steps_per_epoch=10, total_steps=100, warmup_steps=5, lr_drop=6)
    assert [step(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert step(59) == 1.0 and step(60) == pytest.approx(0.1)
    multi = LRSchedule("multistep", steps_per_epoch=10, total_steps=100, milestones=(3, 8), gamma=0.5)
    assert [multi(s) for s in (29, 30, 79, 80)] == [1.0, 0.5, 0.5, 0.25]
    cos = LRSchedule("cosine", steps_per_epoch=10, total_steps=100, min_lr_ratio=0.1)
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    # DEIM's flat-cosine: quadratic warm-up, flat to epoch 4, a half cosine down to 0.5 at epoch 8, then flat at 0.5
    flat = LRSchedule("flat-cosine", steps_per_epoch=10, total_steps=100, warmup_steps=5, lr_drop=4, gamma=0.5,
                      decay_end=8)
    assert [flat(s) for s in range(5)] == pytest.approx([0.04, 0.16, 0.36, 0.64, 1.0])
    assert flat(39) == 1.0 and flat(60) == pytest.approx(0.75) and flat(80) == flat(99) == 0.5
    assert LRSchedule("flat-cosine", steps_per_epoch=10, total_steps=100, lr_drop=4, gamma=0.5)(70) == pytest.approx(
        0.75)  # no decay_end: the decay ends with training
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        LRSchedule("linear", steps_per_epoch=1, total_steps=1)


def test_ema_averages_with_a_ramped_decay_and_counts_shared_weights_once():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.add_module("shared", model[0])  # a tied module: its weight appears twice in the state dict
    ema = ModelEMA(model, decay=0.9, warmup=0)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, start + 0.1)  # 0.9 * old + 0.1 * new, applied once
    assert ema.module[1].num_batches_tracked.item() == 7 and not ema.module[0].weight.requires_grad
    ramped = ModelEMA(model, decay=0.9999, warmup=2000)
    ramped.updates = 1
    assert ramped.decay_now() == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))


def test_epoch_sampler_shards_reshuffles_and_resumes():
    full = list(EpochSampler(10, seed=3))
    assert sorted(i for _, i in full) == list(range(10)) and all(e == 0 for e, _ in full)
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded from 10 to 12 by repeating the start
    assert {i for s in shards for _, i in s} == set(range(10))
    assert [i for _, i in shards[0]] == [i for _, i in full][0::3]
    s = EpochSampler(10, seed=3)
    s.set_epoch(1)
    assert [i for _, i in s] != [i for _, i in full]  # a new order each epoch
    s.set_epoch(1, start=4)
    assert len(s) == 6 and list(s) == _epoch(10, 3, 1)[4:]  # resuming mid-epoch: the rest of the same order


def _epoch(size, seed, epoch):
    s = EpochSampler(size, seed=seed)
    s.set_epoch(epoch)
    return list(s)


def test_seeded_samples_are_the_same_whatever_came_before():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    ds = SeededSamples(Noise(), seed=1)
    a = ds[(0, 2)]
    torch.rand(100)  # other draws in between do not matter
    assert torch.equal(ds[(0, 2)], a) and not torch.equal(ds[(1, 2)], a) and not torch.equal(ds[(0, 3)], a)
    outside = torch.get_rng_state()
    ds[(0, 1)]
    assert torch.equal(torch.get_rng_state(), outside)  # and the caller's generator is left alone


def test_step_checkpoints_keep_the_last_n_and_skip_half_written(tmp_path):
    model = nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        save_step_checkpoint(tmp_path, step, model, {"model": "x"}, {"step": step}, keep=2)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()  # a write interrupted before its rename
    (tmp_path / "checkpoints" / "step_00000008").mkdir()       # a folder without its files
    assert latest_checkpoint(tmp_path).name == "step_00000004" and load_state(latest_checkpoint(tmp_path))["step"] == 4


def _tiny_trainer(synth_dir, out, **kw) -> Trainer:
    cfg = TrainConfig(**{**dict(recipe="none", model="detr_lite", data=str(synth_dir), output_dir=str(out),
                      model_args=dict(TINY),
                             image_size=96, batch_size=2, num_workers=0, progress=False, crop=False, epochs=1,
                             max_train_images=8, max_val_images=2, checkpoint_every=1, log_every=1), **kw})
    return Trainer(cfg)


def _nan_at(trainer, bad_steps: set[int]):
    """Make the criterion return NaN on the given calls (1-based)."""
    original, calls = trainer.criterion, [0]

    def criterion(outputs, targets):
        calls[0] += 1
        losses = original(outputs, targets)
        if calls[0] in bad_steps:
            losses["loss_class"] = losses["loss_class"] * float("nan")
        return losses

    trainer.criterion = criterion


def test_non_finite_loss_is_skipped_with_a_warning(synth_dir, tmp_path):
    trainer = _tiny_trainer(synth_dir, tmp_path / "run")
    _nan_at(trainer, {2})
    with pytest.warns(UserWarning, match=r"non-finite loss at step 2 \(epoch 1, batch 1, image ids \[\d+, \d+\]\); "
                                         r"step skipped \(1 in a row\)"):
        trainer.fit()
    assert trainer.step == 3 and trainer.bad_steps == 0  # 4 batches, one skipped
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_bad_steps_in_a_row_stop_with_the_last_checkpoint_intact(synth_dir, tmp_path):
    trainer = _tiny_trainer(synth_dir, tmp_path / "run", max_bad_steps=2)
    _nan_at(trainer, {2, 3, 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingError, match=r"(?s)2 steps in a row had a non-finite loss.*step_00000001.*intact"):
            trainer.fit()
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_00000001" and load_state(last)["step"] == 1


def test_non_finite_gradient_is_skipped(synth_dir, tmp_path):
    trainer = _tiny_trainer(synth_dir, tmp_path / "run")
    param = next(p for p in trainer.model.parameters() if p.requires_grad)
    calls = [0]

    def poison(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == 1 else grad

    param.register_hook(poison)
    with pytest.warns(UserWarning, match="non-finite gradient at step 1"):
        trainer.fit()
    assert trainer.step == 3 and torch.isfinite(param).all()


def test_a_diverged_model_stops_training_and_is_never_saved(synth_dir, tmp_path):
    """NaN weights (as after an exploding update): every prediction is NaN, the matcher refuses them, each step
    is skipped, training stops, and the NaN weights are not written over the last good checkpoint."""
    trainer = _tiny_trainer(synth_dir, tmp_path / "run", max_bad_steps=3)
    with torch.no_grad():
        trainer.model.class_embed.weight.fill_(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            TrainingError, match="3 steps in a row had a non-finite loss.*no checkpoint was written yet"
        ):
            trainer.fit()
    assert step_checkpoints(tmp_path / "run") == []


def test_param_groups_train_the_models_slow_params_at_its_factor():
    from detrkit import create_model
    from detrkit.engine.train import param_groups

    model = create_model("deformable_detr_lite", num_classes=3, **{k: v for k, v in TINY.items() if k != "nhead"})
    rest, backbone, slow = param_groups(model, lr=1e-4, lr_backbone=1e-5)
    assert (rest["lr"], backbone["lr"]) == (1e-4, 1e-5) and slow["lr"] == 1e-4 * model.slow_lr_factor == 1e-5
    names = {id(p): n for n, p in model.named_parameters()}
    assert slow["params"] and all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
                                  for p in slow["params"])
    detr = create_model("detr_lite", num_classes=3)  # no slow parameters
    assert not param_groups(detr, lr=1e-4, lr_backbone=1e-5)[2]["params"]


def test_logged_lr_is_the_lr_each_step_used(synth_dir, tmp_path):
    """The logs and the progress bar show the learning rate of the step just taken, not the one the optimizer
    already holds for the next step (which, after the last step before a drop, is the dropped one)."""
    trainer = _tiny_trainer(synth_dir, tmp_path / "run", epochs=2, lr_drop=1, lr=1e-4, eval_every=2)
    trainer.fit()
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["lr"] for s in steps] == pytest.approx([1e-4] * 4 + [1e-5] * 4)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in epochs] == pytest.approx([1e-4, 1e-5])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # what a further step would use


def test_the_fused_adamw_makes_the_loops_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    groups = [{"params": list(model[:2].parameters()), "lr": 1e-3}, {"params": list(model[2].parameters()), "lr": 1e-4},
              {"params": [], "lr": 1e-3}]  # an empty group, as a model without slow params has
    fused, loop = adamw(groups, 1e-4), torch.optim.AdamW(
        [{"params": list(twin[:2].parameters()), "lr": 1e-3}, {"params": list(twin[2].parameters()), "lr": 1e-4}],
        weight_decay=1e-4)
    assert fused.defaults["fused"]  # this torch (>= 2.4) has the CPU kernel
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, opt in ((model, fused), (twin, loop)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_amp_auto_trains_in_bf16_on_a_cpu_that_computes_it_natively(monkeypatch, synth_dir, tmp_path):
    from detrkit import runtime
    from detrkit.runtime import amp_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert amp_dtype("auto", cpu, training=True) is torch.bfloat16
    assert amp_dtype("auto", cpu) is None  # inference on a CPU stays fp32 unless asked
    assert amp_dtype("bf16", cpu) is torch.bfloat16 and amp_dtype("none", cpu, training=True) is None
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)  # emulated bf16 would be slower: fp32
    assert amp_dtype("auto", cpu, training=True) is None and amp_dtype("bf16", cpu) is torch.bfloat16

    # the trainer's step runs the network under bf16 autocast, and in fp32 with --amp none (the negative control)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    dtypes = {}
    for amp in ("bf16", "none"):
        trainer = _tiny_trainer(synth_dir, tmp_path / amp, amp=amp)
        conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(lambda _, __, out, amp=amp: dtypes.setdefault(amp, out.dtype) and None)
        trainer.fit()
        assert trainer.step > 0
    assert dtypes == {"bf16": torch.bfloat16, "none": torch.float32}
    with pytest.warns(UserWarning, match=r"--amp fp16 is CUDA's: this CPU run trains in fp32"):
        assert _tiny_trainer(synth_dir, tmp_path / "fp16", amp="fp16").amp_dtype is None
    # asked for bf16 on a CPU that would emulate it (~10x slower: results/cpu_bf16_emulated.json): said; not said
    # where it is native
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"--amp bf16 on a CPU without native bf16"):
        assert _tiny_trainer(synth_dir, tmp_path / "bf16-emulated", amp="bf16").amp_dtype is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _tiny_trainer(synth_dir, tmp_path / "bf16-native", amp="bf16")
