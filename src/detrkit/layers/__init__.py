"""Reusable building blocks: position encodings, MLP, transformer layers, deformable attention, neck."""

from detrkit.layers.deformable import (
    DeformableAnchorDecoder,
    DeformableDecoder,
    DeformableDecoderLayer,
    DeformableEncoder,
    DeformableEncoderLayer,
    MultiScaleDeformableAttention,
    RTDETRDecoder,
)
from detrkit.layers.hybrid_encoder import HybridEncoder
from detrkit.layers.mlp import MLP
from detrkit.layers.neck import MultiScaleProjection
from detrkit.layers.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, anchor_sine_embed
from detrkit.layers.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "DeformableAnchorDecoder",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "HybridEncoder",
    "MLP",
    "MultiScaleDeformableAttention",
    "MultiScaleProjection",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "RTDETRDecoder",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "anchor_sine_embed",
]
