import torch

from detrkit.losses import HungarianMatcher
from detrkit.losses.matcher import union_matches


def _targets(sizes, k=5):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "labels": torch.randint(0, k, (n,), generator=g),
            "boxes": torch.cat(
                [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1
            ),
        }
        for n in sizes
    ]


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


def test_all_layers_are_matched_in_one_pass_and_one_transfer():
    """match_layers gives each layer the assignment matching it alone would, with one device -> host copy."""
    from unittest import mock

    from detrkit.losses.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(0)
    layers, b, q, k = 4, 3, 12, 5
    logits = [torch.randn(b, q, k, generator=g) for _ in range(layers)]
    boxes = [torch.rand(b, q, 4, generator=g) * 0.5 + 0.2 for _ in range(layers)]
    targets = [{"labels": torch.randint(k, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.2}
               for n in (3, 0, 7)]
    matcher = HungarianMatcher(2.0, 5.0, 2.0, focal=True)
    alone = [matcher(lg, bx, targets) for lg, bx in zip(logits, boxes, strict=False)]
    real_cpu, calls = torch.Tensor.cpu, []
    with mock.patch.object(torch.Tensor, "cpu", lambda self, *a, **kw: calls.append(1) or real_cpu(self, *a, **kw)):
        together = matcher.match_layers(logits, boxes, targets)
    assert len(calls) == 1
    for per_layer_alone, per_layer_together in zip(alone, together, strict=False):
        for (r1, c1), (r2, c2) in zip(per_layer_alone, per_layer_together, strict=False):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert len({tuple(together[i][0][0].tolist()) for i in range(layers)}) > 1  # layers really differ


def test_union_of_matches_keeps_every_matched_query_with_its_most_voted_object():
    """GO-LSD's union set (D-FINE section 3.3): a query matched by any layer is in it, with the object most layers
    matched it to (ties: the lowest object index); one object may go with several queries; images stay apart."""
    t = torch.tensor
    empty = t([], dtype=torch.int64)
    layers = [[(t([3, 5]), t([0, 1])), (t([2]), t([0]))],
              [(t([3, 7]), t([1, 0])), (t([2]), t([0]))],
              [(t([3]), t([0])), (empty, empty)],
              [(t([9, 5]), t([1, 0])), (t([4]), t([0]))]]
    (q0, o0), (q1, o1) = union_matches(layers)
    assert q0.tolist() == [3, 5, 7, 9] and o0.tolist() == [0, 0, 0, 1]  # query 5: one vote each, object 0 wins
    assert q1.tolist() == [2, 4] and o1.tolist() == [0, 0]
    # the last layer alone is its own union (no other layer votes)
    (q, o), _ = union_matches(layers[:1])
    assert q.tolist() == [3, 5] and o.tolist() == [0, 1]
    assert [len(q) for q, _ in union_matches([[(empty, empty)]])] == [0]
