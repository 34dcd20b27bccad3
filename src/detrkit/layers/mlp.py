"""A plain multi-layer perceptron (DETR's 3-layer box head)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    Args:
        input_dim: size of the input features.
        hidden_dim: size of every hidden layer.
        output_dim: size of the output.
        num_layers: number of linear layers (>= 1).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        # The attribute is named `layers` as in the official DETR code, so its checkpoints map 1:1.
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=False))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x
