"""What each detection looked at, as pictures: the mechanisms the papers visualise, as a tool.

- DETR (Carion et al. 2020, section 4.2 and Fig. 6): the last decoder layer's cross-attention weights of the
  detection's query over the encoder's feature map (averaged over heads), shown as a heat map.
- Deformable DETR (Zhu et al. 2021, section 5.3 and Fig. 5) and the DINO family built on its decoder: the last
  decoder layer's sampling points of the detection's query, every head and level, coloured and sized by their
  attention weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from detrkit.data.image import to_pil
from detrkit.inference.draw import draw_detections
from detrkit.layers.deformable import MultiScaleDeformableAttention
from detrkit.models.postprocess import select_detections


@dataclass
class Explanation:
    """One detection and where its query looked (``heatmap`` for DETR, ``points`` + ``weights`` for deformable)."""

    box: list[float]  # xyxy pixels of the input image
    score: float
    label: int  # category id
    name: str
    query: int
    heatmap: np.ndarray | None = None  # (h, w) cross-attention over the feature map, sums to 1
    points: np.ndarray | None = None  # (N, 2) x, y pixels of the input image
    weights: np.ndarray | None = None  # (N,) attention weight of each point

    def to_dict(self) -> dict:
        """The detection, rounded for JSON (explain.json)."""
        return {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4), "label": self.label,
                "name": self.name, "query": self.query}


def _last_cross_attention(model: nn.Module) -> nn.Module:
    # the layer whose prediction inference returns: the last, or D-FINE's eval_idx (D-FINE-M stops at its 4th of 5)
    layer = model.decoder.layers[getattr(model.decoder, "eval_idx", -1)]
    attn = getattr(layer, "cross_attn", None) or getattr(layer, "multihead_attn", None)
    if not isinstance(attn, (MultiScaleDeformableAttention, nn.MultiheadAttention)):
        raise NotImplementedError(
            f"explain draws DETR's cross-attention and deformable models' sampling points; "
            f"{type(model).__name__}'s decoder attention ({type(attn).__name__}) is not supported"
        )
    return attn


@torch.no_grad()
def explain(detector, image, *, threshold: float | None = None, max_detections: int = 10) -> list[Explanation]:
    """Detections of ``image`` (path, PIL, array or tensor) by a :class:`~detrkit.Detector`, and what each looked at."""
    model, pil = detector.model, to_pil(image)
    attn, captured = _last_cross_attention(model), {}
    hooks = []
    if isinstance(attn, nn.MultiheadAttention):
        def ask_weights(_, args, kwargs):
            return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

        hooks.append(attn.register_forward_pre_hook(ask_weights, with_kwargs=True))
        hooks.append(attn.register_forward_hook(lambda _, __, out: captured.update(weights=out[1])))  # (B, Q, S)
        hooks.append(model.input_proj.register_forward_hook(lambda _, __, out: captured.update(hw=out.shape[-2:])))
    else:
        attn.record = True
    try:
        outputs = detector.forward_pil([pil], compiled=False)  # hooks see the eager modules
    finally:
        for h in hooks:
            h.remove()
        attn.record = False
    threshold = detector.threshold if threshold is None else threshold
    scores, labels, boxes, queries = select_detections(outputs.pred_logits, outputs.pred_boxes, model.score_activation,
                                                       max_detections)
    h_img, w_img = pil.height, pil.width
    results = []
    for score, label, box, q in zip(scores[0], labels[0], boxes[0], queries[0], strict=False):
        if score < threshold:
            break
        cat = detector.label_to_cat[int(label)]
        exp = Explanation((box * box.new_tensor([w_img, h_img, w_img, h_img])).tolist(), float(score), cat,
                          detector.cat_to_name[cat], int(q))
        if "weights" in captured:
            h, w = captured["hw"]
            exp.heatmap = captured["weights"][0, q].reshape(h, w).float().cpu().numpy()
        else:
            locations, weights = attn.recorded  # (B, Lq, heads, levels, points, 2), (B, Lq, heads, levels, points)
            # fractions of the input, which one unpadded image fills: scale to the original image
            xy = locations[0, q].reshape(-1, 2).float().cpu().numpy() * [w_img, h_img]
            exp.points, exp.weights = xy, weights[0, q].reshape(-1).float().cpu().numpy()
        results.append(exp)
    attn.recorded = None
    return results


def draw_explanation(image: Image.Image, exp: Explanation) -> Image.Image:
    """The image with the detection's box and what it looked at: a heat map, or weighted sampling points."""
    out = image.convert("RGB")
    if exp.heatmap is not None:
        heat = exp.heatmap / max(float(exp.heatmap.max()), 1e-12)
        heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(out.size, Image.BILINEAR)
        red = Image.new("RGB", out.size, (255, 40, 0))
        out = Image.composite(red, out, heat.point(lambda v: int(v * 0.75)))
    if exp.points is not None:
        out = out.copy()
        draw = ImageDraw.Draw(out)
        order = np.argsort(exp.weights)  # heaviest drawn last, on top
        top = max(float(exp.weights.max()), 1e-12)
        for (x, y), wgt in zip(exp.points[order], exp.weights[order], strict=False):
            v = float(wgt) / top
            r = 1.5 + 4.5 * v
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(int(255 * v), int(64 * (1 - v)), int(255 * (1 - v))))
    return draw_detections(out, [exp.box], [exp.label], [exp.score], {exp.label: exp.name}, width=3)
