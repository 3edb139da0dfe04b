"""GRPO maths against values computed by hand from the paper's formulas."""

import math

import pytest
import torch

from scripts import grpo


def logits_for(p_keep: float) -> torch.Tensor:
    """Two logits (discard, keep) whose softmax gives p(keep) = p_keep."""
    return torch.tensor([[0.0, math.log(p_keep / (1 - p_keep))]])


def test_advantage_one_success_in_group_of_four():
    # mean 0.25, population std sqrt(0.1875) = 0.4330127
    adv = grpo.group_advantage(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert adv[0].tolist() == pytest.approx([1.7320508, -0.5773503, -0.5773503, -0.5773503], abs=1e-6)


def test_advantage_is_per_group_and_zero_for_equal_rewards():
    adv = grpo.group_advantage(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]))
    assert adv[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv[1].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])


def test_advantage_std_floor_and_clamp():
    # std 0.000433 < floor 0.01: A = (r - 0.00025) / 0.01
    adv = grpo.group_advantage(torch.tensor([[0.001, 0.0, 0.0, 0.0]]), std_floor=0.01)
    assert adv[0].tolist() == pytest.approx([0.075, -0.025, -0.025, -0.025], abs=1e-6)
    # one success among 100: (0.99 / 0.0995) = 9.95 is clamped to 5
    r = torch.zeros(1, 100)
    r[0, 0] = 1
    assert grpo.group_advantage(r, clamp=5.0)[0, 0].item() == pytest.approx(5.0)
    assert grpo.group_advantage(r)[0, 0].item() == pytest.approx(5.0)  # the default clamp
    # one failure among 100: -9.95 is clamped to -5
    assert grpo.group_advantage(1 - r, clamp=5.0)[0, 0].item() == pytest.approx(-5.0)


@pytest.mark.parametrize(
    "p, p_ref, a, expected",
    [(0.6, 0.5, 2.0, 2.2), (0.6, 0.5, -2.0, -2.4), (0.4, 0.5, 2.0, 1.6), (0.4, 0.5, -2.0, -1.8)],
)
def test_clipped_surrogate(p, p_ref, a, expected):
    # ratio 1.2 clips to 1.1, ratio 0.8 clips to 0.9 (eps 0.1); min of the two products
    out = grpo.clipped_surrogate(torch.tensor([math.log(p)]), torch.tensor([math.log(p_ref)]), torch.tensor([a]), 0.1)
    assert out.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "p, p_ref, a, expected",
    # ratio 9 is bounded to 5: min(5 * -2, 1.1 * -2) = -10 (unbounded: -18); ratio 0.002 -> 0.01: min(0.02, 1.8)
    [(0.9, 0.1, -2.0, -10.0), (0.001, 0.5, 2.0, 0.02)],
)
def test_clipped_surrogate_bounds_the_ratio(p, p_ref, a, expected):
    log_p = torch.tensor([math.log(p)], requires_grad=True)
    out = grpo.clipped_surrogate(log_p, torch.tensor([math.log(p_ref)]), torch.tensor([a]), 0.1)
    assert out.item() == pytest.approx(expected, abs=1e-6)
    out.backward()
    assert log_p.grad.item() == 0.0  # outside the bounds the surrogate gives no gradient


def test_k3_kl():
    # G_ref/G = 0.5/0.6: 0.8333333 - ln(0.8333333) - 1 = 0.0156549
    kl = grpo.k3_kl(torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.5)]))
    assert kl.item() == pytest.approx(0.0156549, abs=1e-6)
    assert grpo.k3_kl(torch.tensor([-0.3]), torch.tensor([-0.3])).item() == 0.0


def test_balanced_ce_weights_classes_equally():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, 0.0]])
    y = torch.tensor([True, False, False])
    # lesion class: -ln 0.75 = 0.2876821; lesion-free: (-ln 0.25 + ln 2) / 2 = 1.0397208
    assert grpo.balanced_ce(logits, y).item() == pytest.approx((0.2876821 + 1.0397208) / 2, abs=1e-6)
    # one class only: its mean
    assert grpo.balanced_ce(logits[1:], y[1:]).item() == pytest.approx(1.0397208, abs=1e-6)


def test_rewards():
    mask = torch.zeros(4, 1, 4, 4, 4)
    mask[0, 0, 1, 1, 1:3] = 1  # lesion in window 0, found by the Focus
    mask[3, 0, 2, 2, 2] = 1  # lesion in window 3, missed by the Focus
    seg = torch.zeros_like(mask)
    seg[0, 0, 1, 1, 2:4] = 1  # overlaps 1 of 2 voxels: Dice 2*1/(2+2) = 0.5
    seg[1, 0, 0, 0, 0] = 1  # false positive in a lesion-free window
    assert grpo.focus_hits(seg, mask).tolist() == [True, False, False, False]
    assert grpo.window_has_lesion(mask).tolist() == [True, False, False, True]
    # keep where the Focus finds the lesion, discard lesion-free windows: each earns 1
    assert grpo.detection_reward(seg, mask, torch.tensor([1, 0, 0, 1])).tolist() == [1.0, 1.0, 1.0, 0.0]
    # discarding a lesion window earns 0, found or missed; keeping a lesion-free window earns 0
    assert grpo.detection_reward(seg, mask, torch.tensor([0, 1, 1, 0])).tolist() == [0.0, 0.0, 0.0, 0.0]
    assert grpo.dice_reward(seg, mask, torch.tensor([1, 1, 0, 0])).tolist() == pytest.approx([0.5, 0.0, 1.0, 0.0])
    assert grpo.dice_reward(seg, mask, torch.tensor([0, 0, 1, 1])).tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    # a lesion-free window with an empty prediction earns nothing when kept (the authors' helper scored it 1)
    empty = torch.zeros_like(mask)
    assert grpo.dice_reward(empty, empty, torch.tensor([1, 1, 1, 1])).tolist() == [0.0] * 4


def test_grpo_loss_combines_surrogate_and_kl():
    loss, kl = grpo.grpo_loss(
        logits_for(0.6), logits_for(0.5), torch.tensor([1]), torch.tensor([2.0]), eps=0.1, beta=0.01
    )
    assert loss.item() == pytest.approx(-(2.2 - 0.01 * 0.0156549), abs=1e-6)
    assert kl.item() == pytest.approx(0.0156549, abs=1e-6)
    # the discard action's probabilities are 0.4 vs 0.5
    loss, _ = grpo.grpo_loss(
        logits_for(0.6), logits_for(0.5), torch.tensor([0]), torch.tensor([2.0]), eps=0.1, beta=0.0
    )
    assert loss.item() == pytest.approx(-1.6, abs=1e-6)


def test_grpo_loss_defaults_are_the_papers_eps_and_beta():
    # eps 0.1 clips the ratio 0.6 / 0.5 to 1.1; beta 0.01 weighs the KL 0.0156549 (as in the test above)
    loss, _ = grpo.grpo_loss(logits_for(0.6), logits_for(0.5), torch.tensor([1]), torch.tensor([2.0]))
    assert loss.item() == pytest.approx(-(2.2 - 0.01 * 0.0156549), abs=1e-6)


def test_policy_gradient_raises_keep_for_positive_advantage():
    logits = logits_for(0.5).requires_grad_(True)
    loss, _ = grpo.grpo_loss(logits, logits_for(0.5), torch.tensor([1]), torch.tensor([1.0]))
    loss.backward()
    assert logits.grad[0, 1] < 0 < logits.grad[0, 0]  # descent raises the keep logit


def test_sample_actions_follow_policy():
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([logits_for(0.9)] * 2000 + [logits_for(0.1)] * 2000)
    a = grpo.sample_actions(logits, generator=g).float()
    assert a[:2000].mean().item() == pytest.approx(0.9, abs=0.03)
    assert a[2000:].mean().item() == pytest.approx(0.1, abs=0.03)


def test_sample_actions_use_the_given_generator_only():
    """Seeded sampling is reproducible and leaves the global RNG alone (a run's other draws stay as they were)."""
    logits = torch.cat([logits_for(0.5)] * 64)
    state = torch.get_rng_state()
    first = grpo.sample_actions(logits, generator=torch.Generator().manual_seed(3))
    second = grpo.sample_actions(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and 0 < int(first.sum()) < 64


def test_dice_reward_of_a_one_voxel_lesion():
    mask = torch.zeros(2, 1, 4, 4, 4)
    mask[:, 0, 1, 1, 1] = 1
    seg = mask.clone()
    seg[1, 0, 2, 2, 2] = 1  # found, plus one false-positive voxel: Dice 2 * 1 / (2 + 1)
    assert grpo.dice_reward(seg, mask, torch.tensor([1, 1])).tolist() == pytest.approx([1.0, 2 / 3])
