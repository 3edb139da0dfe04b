"""Group relative policy optimisation for the Glance model, as pure functions.

Notation follows the GF-Screen paper: a *group* is the N windows cropped from one CT; the Glance policy G gives
p(keep | window); the Focus segmentation of window i is s_i and its lesion mask m_i. Each function works on
tensors shaped (B, N) (B scans, N windows each) or flat (B*N,) where noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .networks import KEEP


def window_has_lesion(mask: torch.Tensor) -> torch.Tensor:
    """y_i: whether window i holds any lesion voxel. ``mask`` is (M, 1, ...) -> (M,) bool."""
    return mask.flatten(1).gt(0).any(1)


def sample_actions(glance_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """o_i ~ G(v_i): sample keep (1) / discard (0) for each window from the current policy, without gradient."""
    p_keep = glance_logits.detach().float().softmax(-1)[..., KEEP]
    return torch.bernoulli(p_keep, generator=generator).long()


def focus_hits(seg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1(s_i ∩ m_i ≠ ∅): the Focus segmentation of window i touches its lesion. (M, 1, ...) -> (M,) bool."""
    return (seg.gt(0) & mask.gt(0)).flatten(1).any(1)


def detection_reward(seg: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Binary reward of a sampled decision: keeping window i earns the paper's r_i = 1(s_i ∩ m_i ≠ ∅);
    discarding it earns 1 where the window holds no lesion.

    The authors' code never sampled actions and pushed p(keep) up or down by the Focus outcome; with sampled
    actions the discard half must be credited explicitly, or a discarded healthy window earns the same 0 as a
    kept one and nothing teaches the Glance to skip it. Discarding a lesion window is never rewarded, even
    where the Focus would miss the lesion: early in training the Focus misses nearly every lesion, and crediting
    such discards taught the Glance to discard every lesion window (measured on phantoms: kept fraction 0 and
    glance CE rising from 0.1 to 2.3 within 13 epochs). ``seg``, ``mask``: binary (M, 1, ...); ``actions``:
    (M,) 1 = keep. Returns (M,) float.
    """
    return torch.where(actions.bool(), focus_hits(seg, mask), ~window_has_lesion(mask)).float()


def dice_reward(seg: torch.Tensor, mask: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Dice reward (the paper's ablation): a kept window earns Dice(s_i, m_i) (0 on lesion-free windows, unlike
    the authors' helper, which scored 1 on every empty ground truth and so rewarded false positives); a
    discarded window earns 1 where it holds no lesion, as in :func:`detection_reward`."""
    s, m = seg.gt(0).flatten(1).float(), mask.gt(0).flatten(1).float()
    inter, total = (s * m).sum(1), s.sum(1) + m.sum(1)
    dice = torch.where(m.sum(1) > 0, 2 * inter / total.clamp_min(1), torch.zeros_like(inter))
    return torch.where(actions.bool(), dice, (~window_has_lesion(mask)).float())


REWARDS = {"binary": detection_reward, "dice": dice_reward}


def group_advantage(rewards: torch.Tensor, std_floor: float = 0.01, clamp: float = 5.0) -> torch.Tensor:
    """A_i = (r_i - mean_group r) / max(std_group r, std_floor), clamped to [-clamp, clamp].

    ``rewards`` is (B, N). The std is the population std of the group (the paper's std{r_1..r_N}); the floor
    keeps a group with one differing reward from exploding, and a group of equal rewards gets A = 0.
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True).clamp_min(std_floor)
    return ((rewards - mean) / std).clamp(-clamp, clamp)


def action_log_prob(glance_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log G(o_i | v_i) of the taken action. ``glance_logits`` (M, 2), ``actions`` (M,) -> (M,)."""
    return glance_logits.float().log_softmax(-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


#: Bounds of ŝ1 = G/G_ref (the authors' code uses the same). G_ref is refreshed only every K epochs, so an action it
#: found unlikely can reach ŝ1 >> 1; with A < 0 the min() then keeps ŝ1·A, unbounded: a run without this bound
#: diverged at epoch 140 (policy loss 112, glance logits ~100, nothing kept afterwards).
RATIO_RANGE = (0.01, 5.0)


def clipped_surrogate(
    log_p: torch.Tensor, log_p_ref: torch.Tensor, advantage: torch.Tensor, eps: float
) -> torch.Tensor:
    """min(ŝ1·A, ŝ2·A) with ŝ1 = G/G_ref bounded to ``RATIO_RANGE`` and ŝ2 = clip(ŝ1, 1-eps, 1+eps), per window."""
    ratio = (log_p - log_p_ref).exp().clamp(*RATIO_RANGE)
    return torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)


def k3_kl(log_p: torch.Tensor, log_p_ref: torch.Tensor) -> torch.Tensor:
    """D_KL(G||G_ref) in the k3 form G_ref/G - log(G_ref/G) - 1 (>= 0, unbiased), per window."""
    log_ratio = log_p_ref - log_p
    return log_ratio.exp() - log_ratio - 1


def balanced_ce(glance_logits: torch.Tensor, has_lesion: torch.Tensor) -> torch.Tensor:
    """Class-balanced cross-entropy CE(o_i, y_i): the mean CE over lesion windows and over lesion-free windows,
    averaged, so the many lesion-free windows do not drown the few lesion windows (with plain CE over windows that
    are mostly lesion-free, the Glance collapses to "keep nothing"). A class absent from the batch is left out."""
    ce = F.cross_entropy(glance_logits.float(), has_lesion.long(), reduction="none")
    parts = [ce[has_lesion == c].mean() for c in (False, True) if (has_lesion == c).any()]
    return torch.stack(parts).mean()


def grpo_loss(
    glance_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    advantage: torch.Tensor,
    eps: float = 0.1,
    beta: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-(1/N) Σ [min(ŝ1·A, ŝ2·A) - β·KL]: the policy part of the GRPO objective as a loss to minimise.

    All tensors are flat over the windows (M,). Returns (loss, mean KL) for logging.
    """
    log_p = action_log_prob(glance_logits, actions)
    log_p_ref = action_log_prob(ref_logits, actions).detach()
    kl = k3_kl(log_p, log_p_ref)
    objective = clipped_surrogate(log_p, log_p_ref, advantage, eps) - beta * kl
    return -objective.mean(), kl.mean().detach()
