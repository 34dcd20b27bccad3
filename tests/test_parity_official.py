"""Parity with the official DETR code (facebookresearch/detr, PyPI package `detr`).

The official package installs top-level `models` / `util` / `datasets` modules, so it is imported
only in a subprocess. That process builds an official DETR with random weights (including random
frozen-BatchNorm statistics), runs it on a padded batch and saves weights, inputs and outputs;
this process converts the weights and checks detrkit's DETR gives the same outputs.
"""

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _detections import assert_same_detections
from _float64 import max_abs_diff

from detrkit import create_model
from detrkit.models.postprocess import postprocess
from detrkit.weights.formats import load_converted, read_checkpoint


def _official_installed() -> bool:
    try:
        importlib.metadata.distribution("detr")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(
    not _official_installed(), reason="the official DETR package is not installed (pip install detr==0.1.4)"
)

OFFICIAL_SCRIPT = textwrap.dedent("""
    import sys, argparse
    import torch, torchvision
    torchvision.__version__ = "0.99.0"  # util/misc.py misparses torchvision >= 0.10
    import models.backbone as backbone_mod
    backbone_mod.is_main_process = lambda: False  # never download ImageNet weights
    from models.backbone import build_backbone
    from models.transformer import build_transformer
    from models.detr import DETR, PostProcess
    from util.misc import NestedTensor

    backbone, dilation, pos, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4]
    sys.path.insert(0, sys.argv[5])  # detrkit's tests/, for PromoteFloat32
    from _float64 import PromoteFloat32
    torch.manual_seed(0)
    args = argparse.Namespace(hidden_dim=64, position_embedding=pos, lr_backbone=1e-5, masks=False, backbone=backbone,
                              dilation=dilation, dropout=0.1, nheads=4, dim_feedforward=128, enc_layers=2, dec_layers=3,
                              pre_norm=False)
    model = DETR(build_backbone(args), build_transformer(args), num_classes=7, num_queries=12, aux_loss=True)
    for name, buf in model.named_buffers():  # random frozen-BN statistics, so the backbone is really compared
        if "running_var" in name:
            buf.uniform_(0.5, 2.0)
        elif "running_mean" in name or name.endswith(".bias"):
            buf.normal_(0, 0.1)
        elif name.endswith(".weight"):
            buf.uniform_(0.5, 1.5)
    model = model.double().eval()  # float64: the bound reflects the maths, not the CPU's kernels
    images = torch.randn(2, 3, 96, 128, dtype=torch.float64)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:, :] = True
    mask[1, :, 80:] = True
    images[1][:, mask[1]] = 0
    with torch.no_grad(), PromoteFloat32():
        o = model(NestedTensor(images, mask))
    sizes = torch.tensor([[480, 640], [300, 500]])
    torch.save({"images": images, "mask": mask, "logits": o["pred_logits"], "boxes": o["pred_boxes"],
                "aux_logits": torch.stack([a["pred_logits"] for a in o["aux_outputs"]]), "sizes": sizes,
                "detections": PostProcess()(o, sizes)}, out)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, out + ".ckpt.pth")  # as main.py saves it
""")


@pytest.mark.parametrize("backbone,dilation,pos", [("resnet18", False, "sine"), ("resnet50", True, "learned")])
def test_detr_matches_official_implementation(tmp_path, backbone, dilation, pos):
    out = tmp_path / "official.pt"
    proc = subprocess.run([sys.executable, "-c", OFFICIAL_SCRIPT, backbone, str(int(dilation)), pos, str(out),
                           str(Path(__file__).parent)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(out, weights_only=True)

    # the official training checkpoint, read the way a user reads it (format detected, classes from the head)
    model = create_model("detr_r50_dc5" if dilation else "detr_r50", weights=f"{out}.ckpt.pth", backbone=backbone,
                         position_embedding=pos, d_model=64, nhead=4, dim_feedforward=128, num_encoder_layers=2,
                         num_decoder_layers=3, num_queries=12)
    assert model.num_classes == 7
    model = model.double().eval()
    load_converted(model, read_checkpoint(f"{out}.ckpt.pth"))  # the file's float64 values, not their float32 rounding
    with torch.no_grad():
        o = model(ref["images"], ref["mask"])
    assert max_abs_diff(o.pred_logits, ref["logits"]) <= 1e-9  # float64 round-off (measured: 1.1e-15)
    assert max_abs_diff(o.pred_boxes, ref["boxes"]) <= 1e-9
    aux = torch.stack([a.pred_logits for a in o.aux_outputs])
    assert max_abs_diff(aux, ref["aux_logits"]) <= 1e-9
    # the official PostProcess (softmax, no-object dropped, boxes scaled to each image's size) vs detrkit's
    mine = postprocess(o, ref["sizes"], score_activation="softmax", top_k=12)
    for m, theirs in zip(mine, ref["detections"], strict=True):
        assert_same_detections(m, theirs, box_tol=1e-9 * 640, score_tol=1e-9)
