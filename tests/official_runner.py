"""Run an official reference implementation with random weights and save what the parity tests compare.

    python tests/official_runner.py REPO MODEL OUT [--size full|tiny] [--dtype float64|float32]

REPO is a clone of the official repository (fundamentalvision/Deformable-DETR, IDEA-Research/DAB-DETR,
IDEA-Research/DN-DETR or IDEA-Research/DINO) and MODEL one of ``MODELS``. Nothing of the official code is
copied into detrkit: it is imported from REPO, in this process only, since each repository installs top-level
``models`` / ``util`` packages that must not meet detrkit's test process. The model is built from the
repository's own argument parser (``main.py: get_args_parser``, plus DINO's config file) with the paper's
settings, its CUDA extension replaced by the repository's own pure-PyTorch ``ms_deform_attn_core_pytorch``.

Writes ``OUT/checkpoint.pth`` (``{"model": state_dict, "args": ..., "epoch": 0}``, as each main.py saves it)
and ``OUT/io.pt``: the inputs, the outputs, and intermediate tensors for a step-by-step comparison.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
import types
from pathlib import Path

import torch
from _float64 import PromoteFloat32  # tests/ is this script's folder, on sys.path

# name -> (repository folder name, module with build + ms_deform_attn_core_pytorch, main.py arguments)
MODELS = {
    "deformable_detr": ("Deformable-DETR", "models.ops.functions.ms_deform_attn_func", []),
    "deformable_detr_refine": ("Deformable-DETR", "models.ops.functions.ms_deform_attn_func", ["--with_box_refine"]),
    "deformable_detr_two_stage": ("Deformable-DETR", "models.ops.functions.ms_deform_attn_func",
                                  ["--with_box_refine", "--two_stage"]),
    "dab_detr": ("DAB-DETR", None, ["--modelname", "dab_detr", "--coco_path", "unused"]),
    "dn_dab_detr": ("DN-DETR", None, ["--modelname", "dn_dab_detr", "--use_dn", "--coco_path", "unused"]),
    "dino_4scale": ("DINO", "models.dino.ops.functions.ms_deform_attn_func", ["-c", "config/DINO/DINO_4scale.py"]),
    "dino_5scale": ("DINO", "models.dino.ops.functions.ms_deform_attn_func", ["-c", "config/DINO/DINO_5scale.py"]),
}

# Smaller transformers for a quicker run (the ResNet-50 stays: the official builders only offer it).
TINY = {"hidden_dim": 64, "dim_feedforward": 128, "enc_layers": 2, "dec_layers": 3, "nheads": 4, "num_queries": 50}


def _stub_cuda_extension(core_module: str | None) -> None:
    """The compiled ``MultiScaleDeformableAttention`` -> the repository's ``ms_deform_attn_core_pytorch``."""
    stub = types.ModuleType("MultiScaleDeformableAttention")

    def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        core = importlib.import_module(core_module).ms_deform_attn_core_pytorch
        return core(value, spatial_shapes, sampling_locations, attention_weights)

    stub.ms_deform_attn_forward = forward
    sys.modules["MultiScaleDeformableAttention"] = stub


def _parse_args(repo: Path, argv: list[str]) -> argparse.Namespace:
    """The repository's own ``get_args_parser`` (taken from main.py without importing its training code)."""
    tree = ast.parse((repo / "main.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
    import numpy as np

    namespace = {"argparse": argparse, "np": np, "DictAction": argparse.Action}
    exec(compile(ast.Module([fn], []), str(repo / "main.py"), "exec"), namespace)  # noqa: S102
    args = namespace["get_args_parser"]().parse_args(argv)
    if getattr(args, "config_file", None):  # DINO: plain-Python config files with a _base_ list
        for key, value in _config_values(repo / args.config_file).items():
            setattr(args, key, value)
    args.device = "cpu"
    return args


def _config_values(path: Path) -> dict:
    """A config file's settings over those of its ``_base_`` files."""
    values: dict = {}
    exec(path.read_text(), values)  # noqa: S102
    merged: dict = {}
    for base in values.get("_base_", []):
        merged |= _config_values(path.parent / base)
    return merged | {k: v for k, v in values.items() if not k.startswith("_")}


def _build(name: str, args: argparse.Namespace):
    import models

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("models.") and module_name.endswith(".backbone") or module_name == "models.backbone":
            module.is_main_process = lambda: False  # never download ImageNet weights
        if module_name.startswith("models.") and hasattr(module, "has_torch_function"):
            # DAB-DETR's copy of torch's attention hands itself to torch-function modes without all its arguments;
            # its inner torch calls still reach PromoteFloat32.
            module.has_torch_function = lambda *_: False
    if name.startswith("deformable_detr"):
        return models.build_model(args)[0]
    if name.startswith("dino"):
        from models.registry import MODULE_BUILD_FUNCS

        return MODULE_BUILD_FUNCS.get(args.modelname)(args)[0]
    return models.build_DABDETR(args)[0]  # DAB-DETR / DN-DETR


def _randomize(model: torch.nn.Module) -> None:
    """Random values everywhere, so that every parameter is really compared: the official inits leave zeros
    (sampling offsets' weights, attention weights, the last box-head layer) and constants (class priors, norms)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0 or (name.endswith(".weight") and "norm" in name):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.05)
        for name, buf in model.named_buffers():  # frozen BatchNorm statistics
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                buf.normal_(0, 0.1)
            elif name.endswith(".weight"):
                buf.uniform_(0.5, 1.5)


def _separate_proposal_scores(model: torch.nn.Module, name: str) -> None:
    """Give the two-stage proposal head weights whose top-k has no ties.

    Proposals at padded or border pixels get zeroed memory, hence all the same score (the bias of the class
    head applied to ``enc_output_norm(enc_output.bias)``); with random weights they can land inside the top-k
    in an order float rounding decides. With ``enc_output.bias = 0`` the zeroed memory normalizes to the norm's
    bias ``beta``, and a class bias of ``c - w_k . beta`` puts every such proposal at score c, below every
    valid one (whose best class scores c + max_k w_k . (gamma * n) > c, for K >= 91 classes all but surely).
    """
    t = model.transformer
    if name.startswith("dino"):
        head, beta = t.enc_out_class_embed, t.enc_output_norm.bias
    else:
        return  # Deformable DETR's two-stage ranks by one class: see _inputs
    with torch.no_grad():
        t.enc_output.bias.zero_()
        head.bias.copy_(-5.0 - head.weight @ beta)


def _inputs(dtype: torch.dtype, size: str, name: str):
    """Two images, the second padded (DETR's NestedTensor: zeros under the mask).

    Deformable DETR's two-stage ranks proposals by one class logit, so the proposals of padded and border pixels
    (zeroed memory, one shared score) sit amid the valid ones and can tie inside the top-k. Its batch has neither:
    no padding, and a width whose stride-8 border centres stay inside (0.01, 0.99).
    """
    h, w = (320, 416) if size == "full" else (192, 256)
    if name == "deformable_detr_two_stage":
        w = 384
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, h, w, generator=g, dtype=dtype)
    mask = torch.zeros(2, h, w, dtype=torch.bool)  # True on padding
    if name != "deformable_detr_two_stage":
        mask[1, h * 3 // 4:, :] = True
        mask[1, :, w * 5 // 8:] = True
    images[1][:, mask[1]] = 0
    return images, mask


def _record(model: torch.nn.Module, name: str) -> dict:
    """Forward hooks on the steps a parity test compares one by one."""
    records: dict = {}

    def keep(key, pick=lambda out: out):
        def hook(module, inputs, output):
            records.setdefault(key, pick(output))
        return hook

    if name.startswith(("deformable", "dino")):
        model.transformer.encoder.register_forward_hook(keep("memory", lambda o: o[0] if isinstance(o, tuple) else o))
    else:
        model.transformer.encoder.register_forward_hook(keep("memory", lambda o: o.transpose(0, 1)))
    if name.startswith("dino"):
        model.transformer.enc_out_class_embed.register_forward_hook(keep("enc_scores"))
    elif name.endswith("two_stage"):
        model.class_embed[-1].register_forward_hook(keep("enc_scores"))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    opts = parser.parse_args()
    folder, core_module, argv = MODELS[opts.model]
    repo = opts.repo.resolve()
    sys.path.insert(0, str(repo))
    _stub_cuda_extension(core_module or "models.dab_deformable_detr.ops.functions.ms_deform_attn_func")
    import torchvision

    torchvision.__version__ = "0.99.0"  # util/misc.py in these repositories misparses torchvision >= 0.10
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # DN-DETR's query builder calls .cuda(); CPU here
    args = _parse_args(repo, argv)
    if opts.size == "tiny":
        for key, value in TINY.items():
            setattr(args, key, value)
    torch.manual_seed(0)
    model = _build(opts.model, args)
    _randomize(model)
    _separate_proposal_scores(model, opts.model)
    dtype = getattr(torch, opts.dtype)
    model = model.to(dtype).eval()
    records = _record(model, opts.model)
    images, mask = _inputs(dtype, opts.size, opts.model)
    from util.misc import NestedTensor

    with torch.no_grad(), (PromoteFloat32() if dtype == torch.float64 else torch.no_grad()):
        if opts.model == "dn_dab_detr":  # as DN-DETR's evaluate() calls it: no denoising part at inference
            out, _ = model(NestedTensor(images, mask), dn_args=args.num_patterns)
        else:
            out = model(NestedTensor(images, mask))
    opts.out.mkdir(parents=True, exist_ok=True)
    saved = {"images": images, "mask": mask, "logits": out["pred_logits"], "boxes": out["pred_boxes"],
             "aux_logits": torch.stack([a["pred_logits"] for a in out["aux_outputs"]]),
             "aux_boxes": torch.stack([a["pred_boxes"] for a in out["aux_outputs"]]), **records}
    if "interm_outputs" in out:  # DINO: the selected encoder proposals
        saved["enc_logits"], saved["enc_boxes"] = (
            out["interm_outputs"]["pred_logits"],
            out["interm_outputs"]["pred_boxes"],
        )
    torch.save(saved, opts.out / "io.pt")
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    if dtype == torch.float64:
        state = model.state_dict()
    torch.save({"model": state, "args": args, "epoch": 0}, opts.out / "checkpoint.pth")


if __name__ == "__main__":
    main()
