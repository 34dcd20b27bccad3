"""Reusable building blocks: position encodings, MLP, transformer layers."""

from detrkit.layers.mlp import MLP
from detrkit.layers.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from detrkit.layers.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "MLP",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
