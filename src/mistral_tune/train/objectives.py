"""The offline preference objectives (DPO and its IPO / hinge / robust variants, ORPO, SimPO, KTO) as
pure functions of sequence log-probabilities: what the policy and, where the method has one, the
reference model give each answer (models/mistral.py sequence_logprobs: summed over the answer's
tokens, with their counts). No model, no data, no loop here: the loop (train/loop.py) measures the
log-probabilities and hands them over; the tests hold each function against TRL's.

Each function returns an Objective: the per-example losses (with their graph), the rewards it logs
and, for ORPO, the answer NLL it adds. Losses are per example rather than already averaged so that
the micro-batches of one optimizer step can be divided by the pairs of the whole step, as the SFT
loss is divided by the trained tokens of the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass
class Objective:
    """One micro-batch's losses and what is logged with them.

    losses: (N,) per pair (per sample for KTO), with gradients; nll_sum / nll_tokens: ORPO's
    negative log-likelihood of the chosen answers (0 for the other methods), divided by the chosen
    tokens rather than the pairs; chosen_rewards / rejected_rewards: detached, one per pair (KTO: per
    desirable / undesirable sample); logps: the policy's log-probabilities logged with them."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_sum: torch.Tensor | float = 0.0
    nll_tokens: int = 0
    paired: bool = True  # KTO's chosen and rejected are different samples: no per-pair accuracy
    extra: dict[str, float] = field(default_factory=dict)  # e.g. KTO's KL estimate

    @property
    def loss(self) -> torch.Tensor:
        """The loss of this batch alone: the mean over its examples (+ ORPO's token-mean NLL)."""
        loss = self.losses.mean() if self.losses.numel() else self.losses.sum()
        return loss + (self.nll_sum / self.nll_tokens if self.nll_tokens else 0.0)

    def metric_sums(self) -> dict[str, tuple[float, int]]:
        """{name: (sum, count)}: summed over micro-batches (and processes) then divided, a step's means."""
        c, r = self.chosen_rewards.detach().double(), self.rejected_rewards.detach().double()
        sums = {
            "rewards/chosen": (float(c.sum()), c.numel()),
            "rewards/rejected": (float(r.sum()), r.numel()),
            "logps/chosen": (float(self.chosen_logps.detach().double().sum()), self.chosen_logps.numel()),
            "logps/rejected": (float(self.rejected_logps.detach().double().sum()), self.rejected_logps.numel()),
        }
        if self.paired:
            sums["rewards/margins"] = (float((c - r).sum()), c.numel())
            sums["rewards/accuracy"] = (float((c > r).double().sum()), c.numel())
        if self.nll_tokens:
            sums["nll"] = (float(torch.as_tensor(self.nll_sum).detach()), self.nll_tokens)
        for k, v in self.extra.items():
            sums[k] = (v, 1)
        return sums

    @property
    def metrics(self) -> dict[str, float]:
        """This batch's means: rewards of chosen and rejected, margins, accuracy, log-probabilities."""
        out = {k: s / n for k, (s, n) in self.metric_sums().items() if n}
        if not self.paired and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with a share label_smoothing of the labels taken as flipped (cDPO)."""
    loss = -F.logsigmoid(logits) * (1 - label_smoothing)
    return loss - F.logsigmoid(-logits) * label_smoothing if label_smoothing else loss


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> Objective:
    """DPO on summed answer log-probabilities (P,) each.

    sigmoid: -log sigmoid(beta * margin), with label_smoothing the conservative form (a share of
    labels assumed flipped); robust: the unbiased estimate under flipped labels (rDPO); hinge:
    relu(1 - beta * margin); ipo: (margin per token - 1 / (2 beta))^2, the log-ratios divided by
    each answer's token count (chosen_tokens / rejected_tokens, required), so that beta does not
    depend on the answers' length. The rewards are beta * (policy - reference) log-ratios."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * margin, label_smoothing)
    elif loss_type == "robust":
        losses = _smoothed_sigmoid(beta * margin, 0.0) * (1 - label_smoothing)
        losses = (losses + F.logsigmoid(-beta * margin) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answers' token counts")
        per_token = (chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1))
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; one of {', '.join(DPO_LOSSES)}")
    return Objective(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(),
                     policy_chosen, policy_rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's split at -log 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, beta: float = 0.1) -> Objective:
    """ORPO: the chosen answers' NLL (token mean) minus beta * log sigmoid(log odds ratio), the odds
    taken from the answers' mean per-token log-probabilities. No reference model. The rewards are
    beta times the mean log-probabilities."""
    avg_c = policy_chosen / chosen_tokens.clamp(min=1)
    avg_r = policy_rejected / rejected_tokens.clamp(min=1)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    return Objective(-beta * ratio, beta * avg_c.detach(), beta * avg_r.detach(), avg_c, avg_r,
                     nll_sum=-policy_chosen.sum(), nll_tokens=int(chosen_tokens.sum()),
                     extra={"log_odds_ratio": float(ratio.detach().mean()) if ratio.numel() else 0.0})


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> Objective:
    """SimPO: -log sigmoid(beta * (mean log-prob of chosen - of rejected) - gamma), the margin gamma
    being a target reward gap; no reference model. The rewards are beta times the mean log-probs."""
    avg_c = policy_chosen / chosen_tokens.clamp(min=1)
    avg_r = policy_rejected / rejected_tokens.clamp(min=1)
    losses = _smoothed_sigmoid(beta * (avg_c - avg_r) - gamma, label_smoothing)
    return Objective(losses, beta * avg_c.detach(), beta * avg_r.detach(), avg_c, avg_r)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, policy_kl: torch.Tensor,
             ref_kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Objective:
    """KTO on unpaired samples: policy / ref (N,) summed answer log-probabilities, desirable (N,) bool.
    The reference point is the KL estimate mean(policy_kl - ref_kl) over mismatched prompt/answer
    samples, clamped at 0 and not differentiated; a desirable answer's loss is
    1 - sigmoid(beta * (log-ratio - KL)), an undesirable one's 1 - sigmoid(beta * (KL - log-ratio)),
    each weighted by its kind's weight. The rewards are beta times the log-ratios."""
    kl = (policy_kl - ref_kl).mean().detach().clamp(min=0) if policy_kl.numel() else policy.new_zeros(())
    ratio = policy - ref
    good, bad = ratio[desirable], ratio[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (good - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - bad)))])
    return Objective(losses, beta * good.detach(), beta * bad.detach(), policy[desirable], policy[~desirable],
                     paired=False, extra={"kl": float(kl)})


NEEDS_REFERENCE = ("dpo", "ipo", "kto")  # ORPO and SimPO compare the policy's own answers


def unit_objective(cfg, policy: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor,
                   desirable: torch.Tensor | None = None) -> Objective:
    """The objective cfg.method names, on units laid out as data/preference.py makes them: (2U,)
    log-probabilities and token counts with each unit's two samples side by side (chosen, rejected;
    for KTO the judged answer and the mismatched one), ref likewise (None without a reference),
    desirable (U,) for KTO."""
    p, n = policy.view(-1, 2), counts.view(-1, 2)
    r = ref.view(-1, 2) if ref is not None else None
    pref, method, beta = cfg.preference, cfg.method, cfg.beta
    if method in ("dpo", "ipo"):
        return dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta, "ipo" if method == "ipo" else pref.loss_type,
                        pref.label_smoothing, n[:, 0], n[:, 1])
    if method == "orpo":
        return orpo_loss(p[:, 0], p[:, 1], n[:, 0], n[:, 1], beta)
    if method == "simpo":
        return simpo_loss(p[:, 0], p[:, 1], n[:, 0], n[:, 1], beta, pref.gamma, pref.label_smoothing)
    if method == "kto":
        return kto_loss(p[:, 0], r[:, 0], desirable, p[:, 1], r[:, 1], beta, pref.desirable_weight,
                        pref.undesirable_weight)
    raise ValueError(f"method {method!r} has no preference objective")


# ---------------------------------------------------------------------------------------------- GRPO
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo")
GRPO_SCALES = ("group", "none")
ADVANTAGE_EPS = 1e-4  # added to a group's reward std: a group of equal rewards gets advantages 0, not 0/0


def grpo_advantages(rewards: torch.Tensor, weights: torch.Tensor, group_size: int,
                    scale: str = "group") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-normalised advantages of (N,) completions laid out group by group (N = prompts x
    group_size), from their (N, K) rewards per reward function. A NaN reward is a failed one: it
    adds nothing to the weighted sum, and a completion whose every reward failed is left out of its
    group's mean and std and gets advantage 0. scale group: (reward - group mean) / (group std +
    1e-4), std with Bessel's correction; none: reward - group mean (Dr. GRPO, no std).
    Returns (advantages, total rewards (NaN where unscorable), whether each group's std is 0)."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown reward scaling {scale!r}; one of {', '.join(GRPO_SCALES)}")
    unscorable = torch.isnan(rewards).all(dim=1)
    total = (rewards * weights.to(rewards)[None, :]).nansum(dim=1)
    total = torch.where(unscorable, torch.full_like(total, math.nan), total)
    grouped = total.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))
    advantages = grouped - mean
    if scale == "group":
        advantages = advantages / (std + ADVANTAGE_EPS)
    std_zero = torch.isclose(std, torch.zeros_like(std)).view(-1)
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0), total, std_zero


@dataclass
class PolicyTerms:
    """One micro-batch of GRPO: `summed` is the loss before the normaliser of its loss type (the sum
    over sequences of their token means for grpo, the sum over tokens for dapo, that sum over
    max_completion_length for dr_grpo), with its graph; divide it by grpo_normaliser of the whole
    optimizer step. sums: {metric: (sum, count)} over the trained tokens (KL, clip fractions)."""

    summed: torch.Tensor
    sums: dict[str, tuple[float, int]]


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> PolicyTerms:
    """The clipped policy-gradient loss of GRPO on (B, T) per-token log-probabilities of sampled
    completions (mask: 1 on completion tokens). old_logps: the sampling policy's (None: this very
    policy, detached; the ratio is then 1 and its gradient the plain policy gradient); ref_logps: the
    reference's, for the KL term beta * (exp(ref - logp) - (ref - logp) - 1) (k3, as GRPO's paper);
    advantages (B,). The ratio is clipped to [1 - epsilon_low, 1 + epsilon_high] (epsilon_high
    larger than epsilon_low: DAPO's clip-higher)."""
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; one of {', '.join(GRPO_LOSSES)}")
    high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages[:, None].to(logps.dtype)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + high) * adv)
    sums: dict[str, tuple[float, int]] = {}
    n_tokens = int(mask.sum())
    if beta:
        if ref_logps is None:
            raise ValueError("a KL term (beta > 0) needs the reference's log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        sums["kl"] = (float((kl.detach() * mask).sum()), n_tokens)
    low_clip = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype) * mask
    high_clip = ((ratio > 1 + high) & (adv > 0)).to(mask.dtype) * mask
    sums["clip_ratio/low"] = (float(low_clip.sum()), n_tokens)
    sums["clip_ratio/high"] = (float(high_clip.sum()), n_tokens)
    sums["clip_ratio"] = (float((low_clip + high_clip).sum()), n_tokens)
    masked = per_token * mask
    if loss_type == "grpo":
        summed = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    elif loss_type == "dapo":
        summed = masked.sum()
    else:
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        summed = masked.sum() / max_completion_length
    return PolicyTerms(summed, sums)


def grpo_normaliser(loss_type: str, n_sequences: int, n_tokens: int) -> int:
    """What a step's summed GRPO terms are divided by: its completions (grpo, dr_grpo) or its
    completion tokens (dapo), over every micro-batch and process."""
    return max(n_tokens if loss_type == "dapo" else n_sequences, 1)
