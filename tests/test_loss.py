"""The loss function: every kind against a hand computation; gradients against autograd and the paper."""

import math

import pytest
import torch

from train_rm import preference_loss

RC = [2.0, 0.5, -1.0]
RR = [1.0, 1.0, -3.0]


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def hand_bt():
    return sum(softplus(-(c - r)) for c, r in zip(RC, RR)) / 3


HAND = {
    "bt": hand_bt(),
    # batch mean of all six rewards is 0.5 / 6
    "bsr": hand_bt() + 0.1 * (0.5 / 6) ** 2,
    # per-pair sums 3, 1.5, -4
    "center": hand_bt() + 0.1 * (9 + 2.25 + 16) / 3,
    "dr": hand_bt() + sum(softplus(-c) + softplus(r) for c, r in zip(RC, RR)) / 3,
    # margins 1, -0.5, 2 -> hinge 0, 1.5, 0
    "hinge": 0.5,
    "norm": sum(softplus(-(c - r) / math.sqrt(c * c + r * r)) for c, r in zip(RC, RR)) / 3,
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_loss_value_against_hand_computation(kind):
    loss, bt = preference_loss(torch.tensor(RC), torch.tensor(RR), kind, lam=0.1, margin=1.0)
    assert loss.item() == pytest.approx(HAND[kind], rel=1e-6)
    assert bt.item() == pytest.approx(hand_bt(), rel=1e-6)


def test_hinge_margin_and_unknown_kind():
    loss, _ = preference_loss(torch.tensor(RC), torch.tensor(RR), "hinge", margin=2.5)
    assert loss.item() == pytest.approx((1.5 + 3.0 + 0.5) / 3)
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(torch.tensor(RC), torch.tensor(RR), "bsrr")


def test_norm_loss_gradient_finite_at_zero_rewards():
    rc = torch.zeros(2, requires_grad=True)
    rr = torch.zeros(2, requires_grad=True)
    loss, _ = preference_loss(rc, rr, "norm")
    loss.backward()
    assert torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()


def _linear_head_batch(n_pairs=4, hidden=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    wp = torch.randn(hidden, generator=gen)
    h = torch.randn(2 * n_pairs, hidden, generator=gen).requires_grad_(True)
    return wp, h


def test_bsr_gradient_on_hidden_state_matches_closed_form():
    """d L_BSR / d h(x_i, y_ij) = (rbar_B / |B|) Wp: eq. 28 with the batch-mean reward rbar_B.

    Eq. 28 prints r(x_i, y_ij) in place of rbar_B; the exact derivative of eq. 25 has the batch mean, the same for
    every item. (The printed form is the gradient of a per-reward penalty (1/2|B|) sum r^2; checked below.)
    """
    n = 4
    wp, h = _linear_head_batch(n)
    rewards = h @ wp
    loss, bt = preference_loss(rewards[:n], rewards[n:], "bsr", lam=1.0)
    (loss - bt).backward()  # the regulariser alone
    rbar = rewards.detach().mean()
    expected = (rbar / n) * wp.expand(2 * n, -1)
    torch.testing.assert_close(h.grad, expected, rtol=1e-5, atol=1e-7)

    # the per-reward penalty is what gives eq. 28's literal r(x_i, y_ij) / |B|; it is a different regulariser
    h.grad = None
    rewards = h @ wp
    (rewards.square().sum() / (2 * n)).backward()
    torch.testing.assert_close(h.grad, (rewards.detach() / n)[:, None] * wp, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(h.grad, expected)


def test_bt_gradient_on_hidden_states_is_symmetric():
    """Eq. 26-27: dL_BT/dh_w = -s(-dr) Wp / |B| and dL_BT/dh_l = +s(-dr) Wp / |B| (batch mean)."""
    n = 3
    wp, h = _linear_head_batch(n, seed=1)
    rewards = h @ wp
    loss, _ = preference_loss(rewards[:n], rewards[n:], "bt")
    loss.backward()
    dr = (rewards[:n] - rewards[n:]).detach()
    coef = torch.sigmoid(-dr) / n
    torch.testing.assert_close(h.grad[:n], -coef[:, None] * wp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad[n:], coef[:, None] * wp, rtol=1e-5, atol=1e-7)


def test_bsr_over_concatenated_batch_differs_from_mean_of_halves():
    """Why the trainer gathers rewards over ranks: the square of a mean is not the mean of squares."""
    rc, rr = torch.tensor(RC + [4.0]), torch.tensor(RR + [3.0])
    full, _ = preference_loss(rc, rr, "bsr", lam=1.0)
    halves = [preference_loss(rc[i:i + 2], rr[i:i + 2], "bsr", lam=1.0)[0] for i in (0, 2)]
    assert abs(full.item() - (halves[0] + halves[1]).item() / 2) > 1e-3


@pytest.mark.parametrize("kind", ["bsr", "center", "bt"])
def test_micro_scope_scales_lambda_by_the_micro_batch_for_bsr_only(kind):
    """--bsr-scope micro (one process): BSR is the official code's per-device form, lam x |micro-batch| x mean^2;
    center (TRL's per-pair term) and the pairwise losses are the same as over the global batch."""
    from train_rm import global_batch_losses

    rewards = {0: (torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.2, 0.7, -1.0]))}
    (loss, weight, bt, _, _), = global_batch_losses(lambda mb: rewards[mb], [0], kind, lam=0.1, scope="micro")
    rc, rr = rewards[0]
    want = preference_loss(rc, rr, kind, lam=0.3 if kind == "bsr" else 0.1)[0]
    assert weight == 1.0 and torch.allclose(loss, want)
    if kind == "bsr":
        assert torch.allclose(loss, bt + 0.1 * 3 * torch.cat([rc, rr]).mean() ** 2)
