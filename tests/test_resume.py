"""Exact resume: a training process killed with SIGKILL continues from its last checkpoint as if never stopped."""

import pytest
import torch
from _runs import run, run_and_kill, steps, train_argv, without_time

from detrkit.engine.checkpoint import load_state
from detrkit.weights.files import step_checkpoints


@pytest.fixture(scope="module")
def reference(synth_dir, tmp_path_factory):
    """The uninterrupted run: 2 epochs x 4 steps, with augmentation (flip, multi-scale, crop)."""
    out = tmp_path_factory.mktemp("reference")
    proc = run(train_argv(synth_dir, out, num_workers=2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_sigkill_mid_epoch_then_resume_is_exact(synth_dir, tmp_path, reference):
    out = tmp_path / "run"
    argv = train_argv(synth_dir, out, num_workers=2)
    killed_at = run_and_kill(argv, after_steps=3)
    assert killed_at < 8
    # atomic checkpoints: whatever the moment of the kill, every step folder is whole, at most 2 are kept
    kept = step_checkpoints(out)
    assert 1 <= len(kept) <= 2
    for ckpt in kept:
        state = load_state(ckpt)
        assert state["step"] == int(ckpt.name.split("_")[1]) and "optimizer" in state
    proc = run(argv + ["--resume", "last"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr + proc.stdout
    # the same losses, step for step (floats compared exactly), and the same per-epoch records and final AP
    assert steps(out / "steps.jsonl") == steps(reference / "steps.jsonl")
    assert without_time(steps(out / "metrics.jsonl")) == without_time(steps(reference / "metrics.jsonl"))
    # the final weights are bit-identical too
    last, ref_last = step_checkpoints(out)[-1], step_checkpoints(reference)[-1]
    a, b = load_state(last), load_state(ref_last)
    assert a["step"] == b["step"] == 8
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=False):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
