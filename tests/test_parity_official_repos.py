"""Parity with the official code of Deformable-DETR, DAB-DETR, DN-DETR and DINO, run from a checkout of each.

Opt-in: set ``DETRKIT_OFFICIAL_REPOS`` to a folder holding clones named as the repositories
(``Deformable-DETR``, ``DAB-DETR``, ``DN-DETR``, ``DINO``; any missing one is skipped), e.g.::

    git clone https://github.com/fundamentalvision/Deformable-DETR official/Deformable-DETR   # and the others
    DETRKIT_OFFICIAL_REPOS=$PWD/official python -m pytest tests/test_parity_official_repos.py

(the official code also needs ``pip install timm addict yapf``). Nothing of the official code is copied into
detrkit. ``tests/official_runner.py`` builds each model from its repository's own arguments (the paper's
settings), gives every parameter a random value, runs it in float64 in a separate process on a padded batch of
two 320x416 images and saves ``{"model": state_dict, "args": ...}`` as the repository's main.py does; this test
loads that file with ``create_model(preset, weights=FILE)`` and compares step by step: the encoder memory at
every position, the two-stage proposal scores at every position, then every decoder layer's logits and boxes.

Both sides run in float64, so the bound is float64 round-off (1e-9), not float32 kernel noise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _float64 import max_abs_diff

from detrkit import create_model
from detrkit.weights.formats import load_converted, read_checkpoint

ROOT = os.environ.get("DETRKIT_OFFICIAL_REPOS")
pytestmark = pytest.mark.skipif(not ROOT, reason="set DETRKIT_OFFICIAL_REPOS to run the official code")
RUNNER = Path(__file__).with_name("official_runner.py")
BOUND = 1e-9  # float64 round-off through a ResNet-50 and 12 transformer layers (measured: <= 5e-14)

# runner model -> (repository, detrkit preset)
CASES = {
    "deformable_detr": ("Deformable-DETR", "deformable_detr_r50"),
    "deformable_detr_refine": ("Deformable-DETR", "deformable_detr_r50_refine"),
    "deformable_detr_two_stage": ("Deformable-DETR", "deformable_detr_r50_two_stage"),
    "dab_detr": ("DAB-DETR", "dab_detr_r50"),
    "dn_dab_detr": ("DN-DETR", "dn_dab_detr_r50"),
    "dino_4scale": ("DINO", "dino_r50_4scale"),
    "dino_5scale": ("DINO", "dino_r50_5scale"),
}


def _run_official(case: str, out: Path) -> dict:
    repo = Path(ROOT) / CASES[case][0]
    if not (repo / "main.py").exists():
        pytest.skip(f"no checkout of {CASES[case][0]} in {ROOT}")
    proc = subprocess.run([sys.executable, str(RUNNER), str(repo), case, str(out)], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "io.pt", weights_only=True)


def _load_float64(preset: str, file: Path) -> torch.nn.Module:
    """The user's path (``create_model(preset, weights=FILE)``), then the same file again into the float64 model,
    so that the weights are the file's float64 values rather than their float32 rounding."""
    model = create_model(preset, weights=file).eval().double()
    load_converted(model, read_checkpoint(file))
    return model


def _proposal_scores_hook(model: torch.nn.Module, records: dict) -> None:
    head = getattr(model, "enc_out_class_embed", None)
    if head is None and getattr(model, "two_stage", False):
        head = model.class_embed[-1]
    if head is not None:
        head.register_forward_hook(lambda m, i, o: records.setdefault("enc_scores", o))
    model.encoder.register_forward_hook(lambda m, i, o: records.setdefault("memory", o))


def _assert_selection_tie_free(scores: torch.Tensor, k: int, per_class_max: bool) -> None:
    """The two-stage top-k must not cut through tied scores, or its order is up to float rounding."""
    ranked = (scores.max(-1).values if per_class_max else scores[..., 0]).sort(-1, descending=True).values  # (B, S)
    gap = (ranked[:, k - 1] - ranked[:, k]).min().item()
    assert gap > 1e-9, f"the top-{k} proposals end inside a tie (gap {gap:g}): the comparison would be meaningless"


@pytest.mark.parametrize("case", list(CASES))
def test_matches_official_code(case, tmp_path):
    ref = _run_official(case, tmp_path)
    model = _load_float64(CASES[case][1], tmp_path / "checkpoint.pth")
    records: dict = {}
    _proposal_scores_hook(model, records)
    with torch.no_grad():
        out = model(ref["images"], ref["mask"])

    assert max_abs_diff(records["memory"], ref["memory"]) <= BOUND  # every position of every level
    if "enc_scores" in ref:
        assert max_abs_diff(records["enc_scores"], ref["enc_scores"]) <= BOUND  # every proposal's score
        _assert_selection_tie_free(ref["enc_scores"], model.num_queries, per_class_max=case.startswith("dino"))
    if "enc_logits" in ref:  # DINO: the selected proposals
        assert max_abs_diff(out.enc_outputs.pred_logits, ref["enc_logits"]) <= BOUND
        assert max_abs_diff(out.enc_outputs.pred_boxes, ref["enc_boxes"]) <= BOUND
    for i, aux in enumerate(out.aux_outputs):  # decoder layer by layer
        assert max_abs_diff(aux.pred_logits, ref["aux_logits"][i]) <= BOUND, f"decoder layer {i}"
        assert max_abs_diff(aux.pred_boxes, ref["aux_boxes"][i]) <= BOUND, f"decoder layer {i}"
    assert max_abs_diff(out.pred_logits, ref["logits"]) <= BOUND
    assert max_abs_diff(out.pred_boxes, ref["boxes"]) <= BOUND
    memory, logits = max_abs_diff(records["memory"], ref["memory"]), max_abs_diff(out.pred_logits, ref["logits"])
    boxes = max_abs_diff(out.pred_boxes, ref["boxes"])
    print(f"\n{case}: max |detrkit - official| memory {memory:.1e}, logits {logits:.1e}, boxes {boxes:.1e}")  # -s


@pytest.mark.parametrize("version,depth,preset,points", [
    ("v1", 18, "rtdetr_r18vd", None), ("v2", 18, "rtdetrv2_r18vd", None), ("v1", 50, "rtdetr_r50vd", None),
    ("v2", 50, "rtdetrv2_r50vd", None), ("v2", 18, "rtdetrv2_r18vd", [4, 2, 1])])
def test_rt_detr_matches_official(version, depth, preset, points, tmp_path):
    """lyuwenyu/RT-DETR (clone named ``RT-DETR``): rtdetr_pytorch / rtdetrv2_pytorch's own PResNet, HybridEncoder
    and decoder, random values, float64, a 320x320 batch of two; its training checkpoint (raw weights under
    ``model``, EMA under ``ema``) loaded by create_model must give the same logits and boxes. Square input: the
    official AIFI position code swaps the axes of non-square maps (detrkit and HF follow the map). ``points``:
    RT-DETRv2's per-level sampling point counts."""
    repo = Path(ROOT) / "RT-DETR"
    if not repo.is_dir():
        pytest.skip(f"no RT-DETR checkout in {ROOT}")
    runner = Path(__file__).with_name("official_rtdetr_runner.py")
    extra = ["320", "320", ",".join(map(str, points))] if points else []
    subprocess.run([sys.executable, str(runner), str(repo), version, str(depth), str(tmp_path), *extra], check=True)
    model = create_model(preset, weights=tmp_path / "checkpoint.pth", **({"n_points": points} if points else {}))
    model = model.double().eval()
    load_converted(model, read_checkpoint(tmp_path / "checkpoint.pth"))  # the file's float64 values
    ref = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        out = model(ref["images"])
    assert max_abs_diff(out.pred_logits, ref["pred_logits"]) <= BOUND
    assert max_abs_diff(out.pred_boxes, ref["pred_boxes"]) <= BOUND
