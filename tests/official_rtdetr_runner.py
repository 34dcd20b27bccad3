"""Build lyuwenyu/RT-DETR's own model from a checkout, give it random values, run it in float64, save its checkpoint.

Run in a separate process by tests/test_parity_official_repos.py (opt-in) and, once, to write the key lists that
tests/test_rt_detr.py checks in the default suite::

    python tests/official_rtdetr_runner.py RT-DETR_CHECKOUT {v1,v2} {18,50} OUT_DIR [HEIGHT WIDTH [POINTS]]

POINTS (v2 only): the decoder's sampling points per level, e.g. ``4,2,1`` (RT-DETRv2's per-level counts).

The official package ``src`` imports its data pipeline on import (which needs an older torchvision); only the
model files are loaded here, under stub parent packages, with ``src.core.register`` as the identity decorator.
Nothing of the official code is copied into detrkit.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _float64 import PromoteFloat32  # noqa: E402


def _stub(name: str, path: Path | None = None, **attrs) -> None:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _register(*args, **kwargs):
    return args[0] if args and callable(args[0]) else (lambda cls: cls)


def build(root: Path, version: str, depth: int, points: list[int] | None = None) -> torch.nn.Module:
    src = root / ("rtdetr_pytorch" if version == "v1" else "rtdetrv2_pytorch") / "src"
    for name in ("src", "src.zoo", "src.zoo.rtdetr", "src.nn", "src.nn.backbone"):
        _stub(name, src.joinpath(*name.split(".")[1:]))
    _stub("src.core", register=_register)
    presnet = importlib.import_module("src.nn.backbone.presnet")
    hybrid = importlib.import_module("src.zoo.rtdetr.hybrid_encoder")
    rtdetr = importlib.import_module("src.zoo.rtdetr.rtdetr")
    small = depth < 50  # the official configs: R18 / R34 train BatchNorm, half-width CSP, fewer decoder layers
    backbone = presnet.PResNet(depth, variant="d", return_idx=[1, 2, 3], freeze_at=-1 if small else 0,
                               freeze_norm=not small, pretrained=False)
    encoder = hybrid.HybridEncoder(in_channels=[128, 256, 512] if small else [512, 1024, 2048], hidden_dim=256,
                                   expansion=0.5 if small else 1.0)
    layers = 3 if small else 6
    if version == "v1":
        decoder = importlib.import_module("src.zoo.rtdetr.rtdetr_decoder").RTDETRTransformer(
            num_classes=80, feat_channels=[256, 256, 256], num_decoder_layers=layers)
    else:
        decoder = importlib.import_module("src.zoo.rtdetr.rtdetrv2_decoder").RTDETRTransformerv2(
            num_classes=80, feat_channels=[256, 256, 256], num_layers=layers, num_points=points or 4)
    return rtdetr.RTDETR(backbone, encoder, decoder)


def main() -> None:
    root, version, depth, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    h, w = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (320, 320)
    points = [int(p) for p in sys.argv[7].split(",")] if len(sys.argv) > 7 else None
    torch.manual_seed(0)
    model = build(root, version, depth, points)
    state = model.state_dict()
    keys = {k: list(v.shape) for k, v in state.items()}
    with torch.no_grad():  # the official init, with every constant-initialised tensor made random
        for name, t in state.items():
            if "num_batches_tracked" in name or not t.is_floating_point():
                continue
            if name.endswith(("anchors", "valid_mask", "num_points_scale")):
                continue
            if "running_var" in name:
                t.uniform_(0.5, 1.5)
            elif any(s in name for s in ("sampling_offsets", "attention_weights", "bbox_head")):
                t.normal_(0, 0.1)
            elif t.numel() > 1 and t.min() == t.max():  # zeros / ones: biases, norms' weights, running means
                t.add_(torch.randn_like(t) * 0.1)
    model = model.double().eval()
    images = torch.rand(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), PromoteFloat32():  # the official code builds anchors and positions in float32
        outputs = model(images)
    out.mkdir(parents=True, exist_ok=True)
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    # as the official trainer saves it: the raw weights under "model", the evaluated EMA under "ema"
    torch.save({"model": raw, "ema": {"module": model.state_dict(), "updates": 1}}, out / "checkpoint.pth")
    torch.save({"images": images, "pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]},
               out / "outputs.pt")
    (out / "keys.json").write_text(json.dumps(keys, indent=0))


if __name__ == "__main__":
    main()
