"""ONNX export: a detector and its postprocessing as one graph, from normalized images to plain tensors.

The graph takes ``images`` (B, 3, H, W), normalized as the model's preset preprocesses them (ImageNet mean / std;
RT-DETR: pixels in [0, 1], sides multiples of 32), without padding,
and returns ``boxes`` (B, K, 4) xyxy in pixels of that input, ``scores`` (B, K) and ``labels`` (B, K) int64
category ids (the checkpoint's, e.g. COCO's), best first. Batch size and image size are dynamic axes.
Deformable attention exports as its pure-PyTorch form: ``sampling="grid_sample"`` (ONNX GridSample, opset >= 16)
or ``sampling="gather"`` (the same bilinear sampling as Gather / GatherElements and arithmetic, for runtimes
without GridSample or with a wrong one, e.g. TensorRT engines). After export, :func:`check_onnx` runs the file in
onnxruntime and compares it with PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from detrkit.layers.deformable import MultiScaleDeformableAttention
from detrkit.models.postprocess import select_detections

# export option -> ms_deform_attn backend (detrkit.ops.ms_deform_attn)
SAMPLING = {"grid_sample": "reference", "gather": "gather"}


class ExportableDetector(nn.Module):
    """``model`` + top-k postprocessing, tensors in and out (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module, label_to_cat: list[int] | None = None, top_k: int = 100) -> None:
        super().__init__()
        self.model, self.top_k = model.eval(), top_k
        n = model.num_classes
        self.register_buffer("label_to_cat", torch.as_tensor(label_to_cat or list(range(n)), dtype=torch.int64))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)
        scores, labels, xyxy, _ = select_detections(out.pred_logits, out.pred_boxes, self.model.score_activation,
                                                    self.top_k)
        # the image size as tensors computed from the input (a tensor built from its shape would freeze the size)
        h, w = (xyxy.new_ones(n).sum() for n in images.shape[-2:])
        return xyxy * torch.stack([w, h, w, h]), scores, self.label_to_cat[labels]


def export_onnx(model: nn.Module, path: str | Path, *, image_size: tuple[int, int] = (640, 640), batch_size: int = 1,
                label_to_cat: list[int] | None = None, top_k: int = 100, opset: int = 18, dynamic: bool = True,
                fp16: bool = False, verify: bool = False, sampling: str = "grid_sample") -> Path:
    """Write ``model`` + postprocessing to ``path`` with the dynamo exporter (torch.export -> ONNX).

    ``image_size``: the (H, W) traced. With ``dynamic``, choose it so that every feature level is larger than one
    pixel (H, W >= 2 x the largest stride, e.g. 128 for a stride-64 level): torch.export takes a size of 1 for a
    constant, and the graph would then accept only images where that level is 1 pixel too.
    ``fp16``: weights and ``images`` in float16 (half the file; scores come out in float32).
    ``verify``: run :func:`verify_onnx` on the written file (onnxruntime against the model; raises on a mismatch).
    ``sampling``: how deformable attention reads its sampling points, ``"grid_sample"`` or ``"gather"`` (no
    GridSample node in the graph); the same numbers either way.
    """
    if sampling not in SAMPLING:
        raise ExportSettingError(f"sampling must be one of {sorted(SAMPLING)}, got {sampling!r}")
    stride = largest_stride(model)
    if dynamic and min(image_size) < 2 * stride:
        raise ExportSettingError(f"image size {image_size[0]}x{image_size[1]} makes the stride-{stride} feature level "
                                 f"one pixel, which a dynamic export would freeze: export at {2 * stride} px or more "
                                 "(or with dynamic axes off)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    wrapper = ExportableDetector(_in_dtype(model, dtype), label_to_cat, top_k).eval()
    # torch.export treats size-1 dimensions as constants: trace a dynamic batch with two images
    sample = torch.randn(max(batch_size, 2) if dynamic else batch_size, 3, *image_size, dtype=dtype)
    shapes = None
    if dynamic:
        batch, height, width = (torch.export.Dim.AUTO,) * 3
        shapes = {"images": {0: batch, 2: height, 3: width}}
    for optimize in (True, False):
        with torch.no_grad(), deformable_sampling(wrapper, sampling):
            program = torch.onnx.export(wrapper, (sample,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                        input_names=["images"], output_names=["boxes", "scores", "labels"],
                                        verbose=False, optimize=optimize)
        program.save(str(path))
        problem = graph_problem(path)
        if problem is None:
            break
        # onnxscript 0.7's optimizer can fuse two clamps of one tensor (DINO's inverse_sigmoid of the same
        # references twice) into nodes of the same name and leave a dangling input; the unoptimised graph is valid
        # and onnxruntime / OpenVINO optimise it when they load it
        warnings.warn(f"the ONNX optimizer produced an invalid graph ({problem}); exported without it", stacklevel=2)
    else:
        raise RuntimeError(f"torch.onnx.export wrote an invalid graph to {path}: {problem}")
    if verify:
        verify_onnx(path, model, image_size=image_size, batch_size=batch_size, dynamic=dynamic,
                    label_to_cat=label_to_cat, top_k=top_k)
    return path


@contextlib.contextmanager
def deformable_sampling(model: nn.Module, sampling: str) -> Iterator[None]:
    """Every deformable-attention layer of ``model`` samples with ``sampling`` inside the block, then as before."""
    layers = [m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)]
    before = [m.backend for m in layers]
    for m in layers:
        m.backend = SAMPLING[sampling]
    try:
        yield
    finally:
        for m, backend in zip(layers, before, strict=True):
            m.backend = backend


def largest_stride(model: nn.Module) -> int:
    """The stride of ``model``'s coarsest feature level: the backbone's last, halved once per extra neck level
    (32 when the backbone does not say)."""
    strides = getattr(getattr(model, "backbone", None), "strides", None) or {"?": 32}
    neck = getattr(model, "neck", None)
    extra = len(neck.input_proj) - neck.num_backbone_levels if hasattr(neck, "num_backbone_levels") else 0
    return max(strides.values()) * 2**extra


def graph_problem(path: str | Path) -> str | None:
    """What ``onnx.checker`` finds wrong with the file (None: a valid graph)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        return str(e).strip().splitlines()[0]
    return None


def graph_operators(path: str | Path) -> set[str]:
    """The ONNX operator types in the file's main graph and its functions (onnxscript exports keep some in local
    functions)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in proto.graph.node}
    for function in proto.functions:
        ops |= {node.op_type for node in function.node}
    return ops


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself in float32; a float16 copy otherwise (the caller's model stays as it is)."""
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def detection_difference(torch_out: tuple[Tensor, ...], onnx_out: tuple, image_size: tuple[int, int]) -> dict:
    """Max abs differences between PyTorch's and onnxruntime's (boxes, scores, labels).

    Scores are compared position by position (both are sorted); each PyTorch detection is then matched to the
    onnxruntime detection of the same label with the closest box, so exactly tied scores ranked in another order
    do not count as differences. Boxes are divided by the image size (differences relative to it).
    """
    boxes, scores, labels = (t.float() if t.is_floating_point() else t for t in torch_out)
    o_boxes, o_scores, o_labels = (torch.from_numpy(a) for a in onnx_out)
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    box_diff = 0.0
    for b, lab, ob, olab in zip(boxes / scale, labels, o_boxes.float() / scale, o_labels, strict=False):
        d = (b[:, None] - ob[None]).abs().amax(-1)  # (K, K): every pair of detections
        d[lab[:, None] != olab[None]] = float("inf")
        box_diff = max(box_diff, d.min(1).values.max().item())
    return {"scores": (scores - o_scores.float()).abs().max().item(), "boxes": box_diff}


def check_onnx(path: str | Path, model: nn.Module, images: Tensor, *, label_to_cat: list[int] | None = None,
               top_k: int = 100) -> dict:
    """Run ``path`` in onnxruntime on ``images`` and compare with the PyTorch model (in the graph's input precision,
    float16 for an fp16 export). Returns the max differences."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = torch.float16 if session.get_inputs()[0].type == "tensor(float16)" else torch.float32
    images = images.to(dtype)
    with torch.no_grad():
        expected = ExportableDetector(_in_dtype(model, dtype), label_to_cat, top_k).eval()(images)
    got = session.run(None, {"images": images.numpy()})
    return detection_difference(expected, got, tuple(images.shape[-2:]))


class ExportSettingError(ValueError):
    """An export option the model cannot be exported with (the message names the option and what would work)."""


class ExportMismatchError(RuntimeError):
    """The exported graph's detections differ from the PyTorch model's beyond the tolerance."""


def verify_onnx(path: str | Path, model: nn.Module, *, image_size: tuple[int, int], batch_size: int = 1,
                dynamic: bool = True, label_to_cat: list[int] | None = None, top_k: int = 100,
                tolerance: float = 1e-3) -> list[dict]:
    """Run the exported graph in onnxruntime against ``model`` on random images (seeded): at the exported shape and,
    for a dynamic export, at one more image and a non-square size too, so the dynamic axes are really dynamic.

    Returns one ``{"shape": (B, 3, H, W), "scores": ..., "boxes": ...}`` row per shape (max differences; boxes
    relative to the image size). Raises :class:`ExportMismatchError` beyond ``tolerance``.
    """
    rows = [{"shape": tuple(images.shape), **check_onnx(path, model, images, label_to_cat=label_to_cat, top_k=top_k)}
            for images in verification_images(image_size, batch_size, dynamic)]
    return refuse_mismatch(rows, f"the ONNX graph {path}", tolerance)


def refuse_mismatch(rows: list[dict], what: str, tolerance: float) -> list[dict]:
    """``rows`` (differences per checked shape), or :class:`ExportMismatchError` naming ``what`` beyond
    ``tolerance``."""
    worst = max(max(r["scores"], r["boxes"]) for r in rows)
    if worst > tolerance:
        raise ExportMismatchError(f"{what} differs from PyTorch by {worst:.2e} > {tolerance:g}; do not use it")
    return rows


def verification_images(image_size: tuple[int, int], batch_size: int, dynamic: bool) -> list[Tensor]:
    """Random images (seeded) at the exported shape and, for a dynamic export, with one more image at a
    non-square size, so that the dynamic axes are really dynamic."""
    h, w = image_size
    shapes = [(batch_size, 3, h, w)]
    if dynamic:
        shapes.append((batch_size + 1, 3, max(32, h * 3 // 4 // 32 * 32), w))
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in shapes]

