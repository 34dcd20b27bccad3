import pytest
import torch

from detrkit.layers import PositionEmbeddingLearned, PositionEmbeddingSine


def test_sine_encoding_ignores_padding():
    """An image padded inside a batch is encoded exactly as it would be alone (DETR's masked cumsum)."""
    pe = PositionEmbeddingSine(16, normalize=True)
    alone = pe(torch.zeros(1, 5, 7, dtype=torch.bool))
    padded_mask = torch.zeros(1, 9, 12, dtype=torch.bool)
    padded_mask[:, 5:, :] = True
    padded_mask[:, :, 7:] = True
    padded = pe(padded_mask)
    assert padded.shape == (1, 32, 9, 12)
    torch.testing.assert_close(padded[:, :, :5, :7], alone)


def test_sine_encoding_spans_zero_to_scale():
    pe = PositionEmbeddingSine(8, normalize=True)
    enc = pe(torch.zeros(1, 4, 4, dtype=torch.bool))
    # channel 0 of each half is sin(coordinate) with coordinate = 2*pi*(i+1)/4
    expected = torch.sin(torch.arange(1, 5) * 2 * torch.pi / 4)
    torch.testing.assert_close(enc[0, 8, 0, :], expected, atol=1e-5, rtol=0)  # x half, along a row
    torch.testing.assert_close(enc[0, 0, :, 0], expected, atol=1e-5, rtol=0)  # y half, down a column


def test_learned_encoding_shape_and_limit():
    pe = PositionEmbeddingLearned(8, max_size=10)
    assert pe(torch.zeros(2, 3, 4, dtype=torch.bool)).shape == (2, 16, 3, 4)
    with pytest.raises(ValueError, match="10x10"):
        pe(torch.zeros(1, 11, 4, dtype=torch.bool))
