"""Long and GPU-only checks. Run with `python -m pytest -m slow` or `python -m pytest -m gpu`."""

import json

import pytest
import torch
from conftest import TINY

from detrkit import create_model
from detrkit.cli import main
from detrkit.losses import build_criterion


@pytest.mark.slow
def test_full_demo_learns(tmp_path):
    """The README's demo (about 13 minutes on 2 cores): the loss falls and AP50 on held-out images is well above zero
    (the README reports what this run printed)."""
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "demo" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert metrics["AP50"] > 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_step_matches_fp32_direction(dtype):
    model = create_model("detr_lite", num_classes=3, **TINY).cuda()
    criterion = build_criterion(model)
    images = torch.randn(2, 3, 96, 96, device="cuda")
    targets = [
        {
            "labels": torch.tensor([0, 1], device="cuda"),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.3]], device="cuda"),
        }
    ] * 2
    with torch.autocast("cuda", dtype=dtype):
        out = model(images)
    losses = criterion(out, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_training_with_amp_scales_fp16_only_and_resumes_the_scaler(synth_dir, tmp_path, amp):
    """fp16 trains with a dynamic loss scaler (its state checkpointed), bf16 without one."""
    from detrkit.engine.checkpoint import latest_checkpoint, load_state
    from detrkit.engine.config import TrainConfig
    from detrkit.engine.train import Trainer

    cfg = TrainConfig(recipe="none", model="deformable_detr_lite", data=str(synth_dir),
                      output_dir=str(tmp_path / "run"),
                      model_args=dict(TINY), image_size=96, batch_size=2, epochs=1, num_workers=0, progress=False,
                      amp=amp, device="cuda", ema=True)
    trainer = Trainer(cfg)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    trainer.fit()
    state = load_state(latest_checkpoint(tmp_path / "run"))
    assert ("scale" in state["scaler"]) == (amp == "fp16") and state["ema_updates"] == trainer.step
