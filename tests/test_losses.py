"""Tests for heartcascade.losses on hand-computed cases (paper eqs. 1-4) and hard Dice."""
from __future__ import annotations

import math

import pytest
import torch

from heartcascade.losses import (
    dice_scores_hard,
    foreground_dice_loss,
    inverse_count_weights,
    multiclass_dice_loss,
    soft_dice_per_class,
    to_onehot,
)
from heartcascade.losses.terms import total_loss
from heartcascade.utils.errors import HCError


def as_volume(values: list[list[float]]) -> torch.Tensor:
    """(C, V) nested list -> probabilities (1, C, 1, 1, V)."""
    return torch.tensor(values, dtype=torch.float64)[None, :, None, None, :]


def table_loss(names: list[str], logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss table's sum of ``names`` (Net2's output, every weight 1) on logits."""
    return total_loss(names, {}, {"net2": (logits, target)}, "inverse_count")[0]


def labels_volume(values: list[int]) -> torch.Tensor:
    """V labels -> (1, 1, 1, V)."""
    return torch.tensor(values)[None, None, None, :]


# hand-computed 2-class case: 4 voxels, true labels 0 0 0 1
P1 = [0.1, 0.2, 0.3, 0.6]
PROBS = as_volume([[1 - p for p in P1], P1])
LABELS = labels_volume([0, 0, 0, 1])
S0 = 2 * (0.9 + 0.8 + 0.7) / (2.8 + 3)  # sum p0 = 0.9+0.8+0.7+0.4
S1 = 2 * 0.6 / (1.2 + 1)


def test_soft_dice_per_class_hand_computed() -> None:
    dice = soft_dice_per_class(PROBS, LABELS, eps=0.0)
    torch.testing.assert_close(dice, torch.tensor([S0, S1], dtype=torch.float64))


def test_inverse_count_weights() -> None:
    w = inverse_count_weights(to_onehot(LABELS, 2))
    torch.testing.assert_close(w, torch.tensor([0.25, 0.75]))  # 1/3 : 1/1, normalised
    # a class absent from the batch gets weight 0, the rest still sum to one
    w3 = inverse_count_weights(to_onehot(LABELS, 3))
    torch.testing.assert_close(w3, torch.tensor([0.25, 0.75, 0.0]))


def test_multiclass_loss_hand_computed_and_weighting() -> None:
    loss = multiclass_dice_loss(PROBS, LABELS, eps=0.0)
    assert math.isclose(float(loss), 1 - (0.25 * S0 + 0.75 * S1), rel_tol=1e-6)
    uniform = multiclass_dice_loss(PROBS, LABELS, weighting="uniform", eps=0.0)
    assert math.isclose(float(uniform), 1 - (S0 + S1) / 2, rel_tol=1e-6)
    explicit = multiclass_dice_loss(PROBS, LABELS, weighting=torch.tensor([1.0, 3.0]), eps=0.0)
    assert math.isclose(float(explicit), float(loss), rel_tol=1e-6)
    # the rare class dominates: a worse rare-class Dice costs more than under uniform weighting
    assert float(loss) > float(uniform)


def test_perfect_prediction_gives_zero() -> None:
    labels = torch.randint(0, 4, (2, 3, 5, 6))
    probs = to_onehot(labels, 4)
    assert float(multiclass_dice_loss(probs, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(foreground_dice_loss(probs, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(table_loss(["L2", "L2_ROI"], probs * 50.0, labels)) == pytest.approx(0.0, abs=1e-6)  # logits


def test_disjoint_prediction_gives_about_one() -> None:
    labels = torch.randint(0, 2, (1, 4, 6, 6))
    wrong = to_onehot(1 - labels, 2)
    assert float(multiclass_dice_loss(wrong, labels)) == pytest.approx(1.0, abs=1e-4)
    # foreground predicted exactly where background is
    assert float(foreground_dice_loss(wrong, labels)) == pytest.approx(1.0, abs=1e-4)


def test_labels_and_onehot_targets_agree() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, 6)
    labels = torch.randint(0, 3, (2, 4, 5, 6))
    probs = torch.softmax(logits, dim=1)
    a = multiclass_dice_loss(probs, labels)
    b = multiclass_dice_loss(probs, labels[:, None])
    c = multiclass_dice_loss(probs, to_onehot(labels, 3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, multiclass_dice_loss(probs, labels.float()[:, None]))
    with pytest.raises(HCError):
        multiclass_dice_loss(probs, labels[:, :2])


def test_foreground_loss_is_binary_dice_of_reversed_background() -> None:
    loss = foreground_dice_loss(PROBS, LABELS, eps=0.0)
    fg_p = torch.tensor(P1, dtype=torch.float64)  # 1 - p_background
    fg_g = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    expected = 1 - 2 * (fg_p * fg_g).sum() / (fg_p.sum() + fg_g.sum())
    assert math.isclose(float(loss), float(expected), rel_tol=1e-6)
    # with 3 classes, confusing two foreground classes does not hurt L_ROI
    labels = labels_volume([0, 1, 2])
    swapped = to_onehot(labels_volume([0, 2, 1]), 3)
    assert float(foreground_dice_loss(swapped, labels)) == pytest.approx(0.0, abs=1e-6)
    # ...while eq. 2 sees two of three equally weighted classes fully wrong
    assert float(multiclass_dice_loss(swapped, labels)) == pytest.approx(2 / 3, abs=1e-4)


def test_gradient_signs_on_probabilities() -> None:
    probs = PROBS.clone().requires_grad_(True)
    multiclass_dice_loss(probs, LABELS).backward()
    g = probs.grad[0, :, 0, 0]
    assert g[1, 3] < 0  # raising p(class 1) on the true class-1 voxel lowers the loss
    assert g[0, 0] < 0  # same for a true background voxel
    assert g[1, 0] > 0  # raising p(class 1) on a background voxel (false positive) raises it
    probs.grad = None
    foreground_dice_loss(probs, LABELS).backward()
    assert probs.grad[0, 0, 0, 0, 3] > 0  # more background prob on a foreground voxel is worse


def test_gradient_signs_on_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (1, 2, 4, 4))
    table_loss(["L2", "L2_ROI"], logits, labels).backward()
    true_logit_grad = logits.grad.gather(1, labels[:, None]).squeeze(1)
    assert (true_logit_grad < 0).all()  # raising the true class's logit always helps


def test_empty_class_is_ignored_and_all_empty_is_finite() -> None:
    labels = labels_volume([0, 0, 1, 1])  # class 2 absent
    probs = as_volume([[0.8, 0.8, 0.1, 0.1], [0.1, 0.1, 0.8, 0.8], [0.1, 0.1, 0.1, 0.1]])
    loss = multiclass_dice_loss(probs, labels, eps=0.0)
    d = soft_dice_per_class(probs, labels, eps=0.0)
    assert math.isclose(float(loss), 1 - 0.5 * float(d[0] + d[1]), rel_tol=1e-6)
    # a one-hot target with no labelled voxel: loss 0, gradient defined, and excluded from the mean
    empty = torch.zeros(1, 2, 1, 1, 3)
    p = torch.full((1, 2, 1, 1, 3), 0.5, requires_grad=True)
    out = multiclass_dice_loss(p, empty)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(p.grad).all()
    both = torch.cat([empty, to_onehot(labels_volume([0, 1, 1]), 2)])
    per_sample = multiclass_dice_loss(torch.cat([p.detach(), to_onehot(labels_volume([0, 1, 1]), 2)]),
                                      both, batch_dice=False)
    assert float(per_sample) == pytest.approx(0.0, abs=1e-6)  # only the perfect second sample counts


def test_batch_dice_false_is_mean_of_samples() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 2, 3, 3)
    labels = torch.randint(0, 2, (2, 2, 3, 3))
    probs = torch.softmax(logits, dim=1)
    per = multiclass_dice_loss(probs, labels, batch_dice=False)
    singles = [multiclass_dice_loss(probs[i:i + 1], labels[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(per, (singles[0] + singles[1]) / 2)


def test_loss_table_weights_terms_and_handles_bf16() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 3, 4, 4))
    combined, terms = total_loss(["L2", "L2_ROI"], {"L2_ROI": 0.5}, {"net2": (logits, labels)}, "inverse_count")
    probs = torch.softmax(logits, dim=1)
    expected = multiclass_dice_loss(probs, labels) + 0.5 * foreground_dice_loss(probs, labels)
    torch.testing.assert_close(combined, expected)
    torch.testing.assert_close(terms["L2"], multiclass_dice_loss(probs, labels))
    bf = table_loss(["L2", "L2_ROI"], logits.bfloat16(), labels)
    assert bf.dtype == torch.float32 and torch.isfinite(bf)


def test_dice_scores_hard() -> None:
    pred = torch.tensor([0, 0, 1, 1, 1, 0])
    target = torch.tensor([0, 1, 1, 1, 0, 0])
    scores = dice_scores_hard(pred, target, num_classes=3)
    # class 0: pred {0,1,5}, target {0,4,5}: 2*2/6; class 1: pred {2,3,4}, target {1,2,3}: 2*2/6
    torch.testing.assert_close(scores[:2], torch.tensor([2 / 3, 2 / 3]))
    assert math.isnan(float(scores[2]))  # absent from both
    assert float(dice_scores_hard(pred, target, 3, empty_value=1.0)[2]) == 1.0
    assert float(dice_scores_hard(target, target, 2).min()) == 1.0
    with pytest.raises(HCError):
        dice_scores_hard(pred, target[:3], 3)


def test_cross_entropy_matches_hand_computed_and_accepts_both_target_forms() -> None:
    from heartcascade.losses import cross_entropy_loss

    logits = torch.log(PROBS.float())  # softmax(log p) = p, since each voxel's p sums to 1
    expected = -sum(math.log(p) for p in (0.9, 0.8, 0.7, 0.6)) / 4
    assert float(cross_entropy_loss(logits, LABELS)) == pytest.approx(expected, rel=1e-5)
    assert float(cross_entropy_loss(logits, LABELS[:, None])) == pytest.approx(expected, rel=1e-5)
    onehot = to_onehot(LABELS, 2)
    assert float(cross_entropy_loss(logits, onehot)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(HCError, match="cross-entropy target"):
        cross_entropy_loss(logits, LABELS[..., :2])


def test_cross_entropy_gradient_raises_the_true_class_logit() -> None:
    from heartcascade.losses import cross_entropy_loss

    logits = torch.zeros(1, 3, 1, 1, 4, requires_grad=True)
    cross_entropy_loss(logits, torch.tensor([[[[0, 1, 2, 1]]]])).backward()
    grad = logits.grad[0, :, 0, 0]
    for voxel, label in enumerate([0, 1, 2, 1]):
        assert grad[label, voxel] < 0  # descending the loss raises the true class
        assert all(grad[c, voxel] > 0 for c in range(3) if c != label)
