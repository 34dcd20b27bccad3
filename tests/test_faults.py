"""Fault injection: broken data, killed processes, damaged checkpoints, non-finite steps.

Run with ``python -m pytest -m faults`` (a few minutes on 2 CPU cores); the end of the output lists every
fault that was injected and what detrkit did about it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _datasets import square_copy
from _runs import env, run, run_and_kill, steps, train_argv, without_time
from conftest import TINY
from PIL import Image

from detrkit.engine.checkpoint import load_state
from detrkit.weights.files import step_checkpoints

pytestmark = pytest.mark.faults


# -- broken data ---------------------------------------------------------------------------------------------
def _inject(root: Path, kind: str) -> str:
    """Break the train split of the dataset copy at ``root`` in one way; returns what the doctor calls it."""
    ann_file = root / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    img, ann = coco["images"][0], coco["annotations"][0]
    if kind == "missing image":
        (root / "train" / img["file_name"]).unlink()
    elif kind == "unreadable image":
        (root / "train" / img["file_name"]).write_bytes(b"\x00" * 100)
    elif kind == "truncated image":
        path = root / "train" / img["file_name"]
        path.write_bytes(path.read_bytes()[:600])
    elif kind == "empty box":
        ann["bbox"][2] = 0
    elif kind == "negative box":
        ann["bbox"][3] = -4
        kind = "empty box"
    elif kind == "box outside the image":
        ann["bbox"][:2] = [img["width"] + 10, img["height"] + 10]
    elif kind == "unknown category":
        ann["category_id"] = 999
    elif kind == "unknown image":
        ann["image_id"] = 123456
    elif kind == "duplicate image id":
        coco["images"].append({**coco["images"][1], "id": img["id"]})
    elif kind == "duplicate annotation id":
        coco["annotations"][1]["id"] = ann["id"]
    elif kind == "malformed bbox":
        ann["bbox"] = [1, 2, "3", None]
    ann_file.write_text(json.dumps(coco))
    return kind


DATA_FAULTS = ["missing image", "unreadable image", "truncated image", "empty box", "negative box",
               "box outside the image", "unknown category", "unknown image", "duplicate image id",
               "duplicate annotation id", "malformed bbox"]


@pytest.mark.parametrize("kind", DATA_FAULTS)
def test_broken_data_is_reported_refused_or_skipped(synth_dir, tmp_path, kind, record_fault, capsys):
    from detrkit.cli import main

    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    name = _inject(root, kind)
    # the doctor names it and fails
    assert main(["data", "check", str(root)]) == 1
    assert f"ERROR {name}" in capsys.readouterr().out
    # training refuses it with the report (a truncated file passes the header check and fails when read)
    argv = ["train", "--data", str(root), "--output_dir", str(tmp_path / "run"), "--model", "detr_lite",
            "--model_args", json.dumps(TINY), "--image_size", "96", "--batch_size", "4", "--epochs", "1",
            "--num_workers", "0", "--progress", "false", "--max_val_images", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (name in err or "cannot read image" in err) and "Traceback" not in err
    # --skip-invalid trains on the rest and says what it dropped
    with pytest.warns(UserWarning, match="dropped|next image is used"):
        assert main(argv + ["--output_dir", str(tmp_path / "skip"), "--skip-invalid", "true"]) == 0
    assert (tmp_path / "skip" / "metrics.json").is_file()
    record_fault(f"data: {kind}", "data check exits 1 naming it; train exits 2 with the report; --skip-invalid trains")


def test_every_image_mode_trains(synth_dir, tmp_path, record_fault):
    """The same dataset with its images saved as grayscale, RGBA, palette, 16-bit and EXIF-rotated files."""
    from detrkit.cli import main

    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    modes = ["L", "RGBA", "P", "I;16", "exif"]
    for img, mode in zip(coco["images"], modes * 3, strict=False):
        path = root / "train" / img["file_name"]
        rgb = Image.open(path).convert("RGB")
        if mode == "I;16":
            Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)).save(path.with_suffix(".png"))
        elif mode == "exif":  # stored sideways, EXIF orientation 8 (rotate 90 counter-clockwise... to display)
            exif = Image.Exif()
            exif[0x0112] = 8
            rgb.transpose(Image.Transpose.ROTATE_270).save(path.with_suffix(".png"), exif=exif.tobytes())
        else:
            rgb.convert(mode).save(path.with_suffix(".png"))
        path.unlink()
        img["file_name"] = path.with_suffix(".png").name
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    assert main(["data", "check", str(root)]) == 0
    assert main(["train", "--data", str(root), "--output_dir", str(tmp_path / "run"), "--model", "detr_lite",
                 "--model_args", json.dumps(TINY), "--image_size", "96", "--epochs", "1", "--num_workers", "0",
                 "--progress", "false", "--max_val_images", "2"]) == 0
    record_fault("images: grayscale, RGBA, palette, 16-bit, EXIF-rotated", "checked clean and trained")


# -- killed processes ----------------------------------------------------------------------------------------
KILL_CONFIGS = {
    # DINO draws denoising noise from the global RNG, averages weights (EMA), warms up and decays by cosine;
    # two workers load the data (their augmentation must not depend on what they loaded before)
    "dino_ema_cosine_workers": dict(model="dino_lite", ema="true", ema_warmup=2, lr_schedule="cosine", warmup_steps=3,
                                    num_workers=2),
    # gradient accumulation over 2 batches: checkpoints fall on optimizer steps only
    "deformable_accumulate": dict(accumulate=2, max_train_images=12, epochs=3),
}


@pytest.fixture(scope="module")
def references(synth_dir, tmp_path_factory):
    out = {}
    for name, opts in KILL_CONFIGS.items():
        path = tmp_path_factory.mktemp(f"ref_{name}")
        proc = run(train_argv(synth_dir, path, **opts))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = path
    return out


@pytest.mark.parametrize("config", list(KILL_CONFIGS))
@pytest.mark.parametrize("after,delay", [(1, 0.0), (2, 0.03), (4, 0.1)])
def test_sigkill_at_any_moment_resumes_exactly(synth_dir, tmp_path, references, config, after, delay, record_fault):
    out = tmp_path / "run"
    argv = train_argv(synth_dir, out, **KILL_CONFIGS[config])
    killed = run_and_kill(argv, after_steps=after, delay=delay)
    proc = run(argv + ["--resume", "last"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = references[config]
    assert steps(out / "steps.jsonl") == steps(ref / "steps.jsonl")
    assert without_time(steps(out / "metrics.jsonl")) == without_time(steps(ref / "metrics.jsonl"))
    record_fault(f"SIGKILL {config} {delay:.2f}s after step {after} (log had {killed} steps)",
                 "resumed: identical losses and metrics")


def test_sigkill_while_writing_a_checkpoint(synth_dir, tmp_path, references, record_fault):
    """Killed halfway through writing checkpoint 3's state.pt: checkpoint 3 does not exist, 2 resumes exactly."""
    out = tmp_path / "run"
    argv = train_argv(synth_dir, out, **KILL_CONFIGS["deformable_accumulate"])
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_worker.py")), *argv],
                          env={**env(), "FAULT_KILL_ON_SAVE": "3"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9
    assert [p.name for p in step_checkpoints(out)] == ["step_00000001", "step_00000002"]
    assert (out / "checkpoints" / "step_00000003.tmp").is_dir()  # the half-written one, never renamed into place
    proc = run(argv + ["--resume", "last"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert steps(out / "steps.jsonl") == steps(references["deformable_accumulate"] / "steps.jsonl")
    record_fault("SIGKILL halfway through a checkpoint's state.pt", "previous checkpoint resumed exactly")


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(synth_dir, tmp_path, record_fault):
    out = tmp_path / "run"
    argv = train_argv(synth_dir, out, epochs=1, keep_checkpoints=3)
    assert run(argv).returncode == 0
    newest = step_checkpoints(out)[-1]
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:100])  # e.g. a full disk, later
    proc = run(train_argv(synth_dir, out, epochs=2, keep_checkpoints=3) + ["--resume", "last"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"cannot read checkpoint {newest}" in proc.stderr and "resumed from" in proc.stdout
    assert load_state(step_checkpoints(out)[-1])["step"] == 8
    record_fault("latest checkpoint's state.pt truncated after the fact", "warned, resumed from the one before")


# -- non-finite steps ----------------------------------------------------------------------------------------
def test_nan_on_one_rank_is_skipped_by_both(synth_dir, tmp_path, record_fault):
    """Only rank 1's loss is NaN: both ranks skip the step together (no hang, no divergence)."""
    from test_distributed import _free_port

    data = square_copy(synth_dir, tmp_path / "square", 96)
    out = tmp_path / "ddp"
    cfg = dict(model="deformable_detr_lite", data=str(data), model_args={**TINY, "backbone_norm": "frozen"},
               image_size=96, epochs=1, batch_size=2, num_workers=0, progress=False, log_every=1, checkpoint_every=0,
               device="cpu", max_val_images=2, output_dir=str(out))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", str(Path(__file__).with_name("ddp_worker.py")),
                           json.dumps(cfg), json.dumps({"nan_rank": 1, "nan_call": 2})],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "non-finite loss at step 2" in proc.stderr
    assert [r["step"] for r in steps(out / "steps.jsonl")] == [1, 2]  # 3 batches per rank, one skipped
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    record_fault("NaN loss on rank 1 of 2 (gloo DDP)", "both ranks skipped the step, weights stayed identical")
