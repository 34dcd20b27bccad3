import torch

from detrkit.losses import HungarianMatcher


def _targets(sizes, k=5):
    g = torch.Generator().manual_seed(1)
    return [{"labels": torch.randint(0, k, (n,), generator=g),
             "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1)}
            for n in sizes]


def test_batched_matching_equals_per_image():
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(3, 12, 6), torch.rand(3, 12, 4) * 0.5 + 0.25
    targets = _targets([4, 0, 7])
    batched = matcher(logits, boxes, targets)
    for i, t in enumerate(targets):
        (rows, cols), = matcher(logits[i : i + 1], boxes[i : i + 1], [t])
        assert torch.equal(batched[i][0], rows) and torch.equal(batched[i][1], cols)


def test_empty_targets_give_empty_matches():
    matcher = HungarianMatcher(focal=True)
    out = matcher(torch.randn(2, 5, 3), torch.rand(2, 5, 4), _targets([0, 0]))
    assert [(len(r), len(c)) for r, c in out] == [(0, 0), (0, 0)]


def test_perfect_predictions_are_matched_to_their_targets():
    """Predictions that are a permutation of the targets (with confident logits) recover that permutation."""
    targets = _targets([6])
    perm = torch.randperm(10)[:6]  # query perm[j] predicts target j
    boxes = torch.rand(1, 10, 4) * 0.1 + 0.45
    logits = torch.full((1, 10, 6), -5.0)
    boxes[0, perm] = targets[0]["boxes"]
    logits[0, perm, targets[0]["labels"]] = 5.0
    (rows, cols), = HungarianMatcher()(logits, boxes, targets)
    assert len(rows) == 6
    assert torch.equal(perm[cols], rows)


def test_each_target_matched_once_when_more_targets_than_queries():
    (rows, cols), = HungarianMatcher()(torch.randn(1, 3, 6), torch.rand(1, 3, 4), _targets([5]))
    assert len(rows) == 3 and len(set(rows.tolist())) == 3 and len(set(cols.tolist())) == 3
