"""The preference objectives against TRL's own code on the same log-probabilities, in float64: the
losses and their gradients with respect to the policy's per-token log-probabilities.

TRL computes these losses inside its trainers' methods, reading hyper-parameters and a few
services (the accelerator's gather, the metrics dict) from the trainer. Each check calls TRL's
unbound method on a stand-in trainer that holds only those; for DPO and KTO, whose methods run the
model themselves, the stand-in "model" returns the given per-token log-probabilities and the
reference ones arrive precomputed in the batch, a path TRL itself supports."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.train.objectives import dpo_loss, kto_loss, orpo_loss, simpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

TOL = dict(rtol=1e-6, atol=1e-6)
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           unwrap_model=lambda m: m)


def _trainer(**hparams):
    """The attributes TRL's loss methods read, and nothing of a model or a dataset."""
    return SimpleNamespace(accelerator=_accelerator(), model=SimpleNamespace(training=True),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           aux_loss_enabled=False, args=SimpleNamespace(), **hparams)


def _model_returning(per_token: torch.Tensor):
    """The stand-in model: whatever the batch, these per-token log-probabilities (zero off the answer)."""
    zeros = torch.zeros_like(per_token)
    return lambda **_kw: SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                         is_top1=zeros.bool())


@st.composite
def sequences(draw, n: int | None = None):
    """n sequences (or 1-6 pairs, 2n) of answer tokens: per-token log-probabilities of the policy
    and of the reference, and each answer's mask (the first position is always prompt)."""
    n = n or 2 * draw(st.integers(1, 6))
    width = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width, (n,), generator=gen)
    mask = torch.zeros(n, width + 1, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        mask[i, width + 1 - k:] = 1
    scale = draw(st.sampled_from([0.05, 1.0, 4.0]))
    policy = (-torch.rand(n, width, generator=gen, dtype=torch.float64) * scale - 1e-3) * mask[:, 1:]
    ref = (-torch.rand(n, width, generator=gen, dtype=torch.float64) * scale - 1e-3) * mask[:, 1:]
    return policy.requires_grad_(), ref, mask


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


@HYP
@given(seqs=sequences(), beta=st.floats(0.01, 2.0), loss_type=st.sampled_from(["sigmoid", "ipo", "hinge", "robust"]),
       label_smoothing=st.floats(0.0, 0.4))
def test_dpo_equals_trl(seqs, beta, loss_type, label_smoothing):
    policy, ref, mask = seqs
    if loss_type == "sigmoid":
        label_smoothing = 0.0  # TRL's DPO sigmoid has none; the smoothed one is checked below
    trainer = _trainer(beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type], loss_weights=[1.0],
                       f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
                       use_weighting=False)
    ref_sums = ref.sum(1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_sums.chunk(2)[0], "ref_rejected_logps": ref_sums.chunk(2)[1]}
    theirs = trl_dpo.DPOTrainer._compute_loss(trainer, _model_returning(policy), inputs, False)

    sums, counts = policy.sum(1), mask.sum(1)
    ours = dpo_loss(*sums.chunk(2), *ref_sums.chunk(2), beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, chosen_tokens=counts.chunk(2)[0],
                    rejected_tokens=counts.chunk(2)[1])
    torch.testing.assert_close(ours.loss, theirs, **TOL)
    torch.testing.assert_close(_grad(ours.loss, policy), _grad(theirs, policy), **TOL)
    logged = trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours.metrics[name] == pytest.approx(logged[name][-1], rel=1e-6, abs=1e-6)
    assert ours.metrics["rewards/accuracy"] == pytest.approx(logged["rewards/accuracies"][-1])


@HYP
@given(seqs=sequences(), beta=st.floats(0.01, 2.0), label_smoothing=st.floats(0.0, 0.45))
def test_conservative_dpo_equals_trl_smoothed_sigmoid(seqs, beta, label_smoothing):
    """DPO's sigmoid with label smoothing (cDPO): TRL writes that formula in CPO's sigmoid loss, on the
    difference of the two log-probabilities it is given; given the log-ratios it is cDPO."""
    policy, ref, mask = seqs
    sums, ref_sums = policy.sum(1), ref.sum(1)
    trainer = _trainer(beta=beta, label_smoothing=label_smoothing, loss_type="sigmoid", alpha=0.0)
    pc, pr = sums.chunk(2)
    rc, rr = ref_sums.chunk(2)
    theirs = trl_cpo.CPOTrainer.cpo_loss(trainer, pc - rc, pr - rr)[0].mean()
    ours = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing).loss
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours, policy), _grad(theirs, policy), **TOL)


@HYP
@given(seqs=sequences(), beta=st.floats(0.01, 2.0))
def test_orpo_equals_trl(seqs, beta):
    policy, _, mask = seqs
    sums, counts = policy.sum(1), mask.sum(1)
    (pc, pr), (nc, nr) = sums.chunk(2), counts.chunk(2)
    trainer = _trainer(beta=beta)
    losses, chosen_r, rejected_r, ratio, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, pc / nc, pr / nr)
    # TRL's NLL term: cross-entropy over the chosen answers' tokens, their mean (the stand-in per-token
    # log-probabilities are zero off the answers, as a model's are where the labels are ignored)
    theirs = -pc.sum() / nc.sum() - losses.mean()
    ours = orpo_loss(pc, pr, nc, nr, beta=beta)
    torch.testing.assert_close(ours.loss, theirs, **TOL)
    torch.testing.assert_close(_grad(ours.loss, policy), _grad(theirs, policy), **TOL)
    # TRL's odds-ratio term is computed in float32 whatever its inputs (it calls .float())
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, check_dtype=False, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, check_dtype=False, **TOL)
    assert ours.metrics["log_odds_ratio"] == pytest.approx(float(ratio), rel=1e-6, abs=1e-6)


@HYP
@given(seqs=sequences(), beta=st.floats(0.1, 10.0), gamma=st.floats(0.0, 3.0), label_smoothing=st.floats(0.0, 0.4))
def test_simpo_equals_trl(seqs, beta, gamma, label_smoothing):
    policy, _, mask = seqs
    sums, counts = policy.sum(1), mask.sum(1)
    (pc, pr), (nc, nr) = sums.chunk(2), counts.chunk(2)
    trainer = _trainer(beta=beta, label_smoothing=label_smoothing, loss_type="simpo", simpo_gamma=gamma, alpha=0.0)
    losses, chosen_r, rejected_r = trl_cpo.CPOTrainer.cpo_loss(trainer, pc / nc, pr / nr)  # SimPO: mean log-probs
    ours = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours.loss, losses.mean(), **TOL)
    torch.testing.assert_close(_grad(ours.loss, policy), _grad(losses.mean(), policy), **TOL)
    torch.testing.assert_close(ours.chosen_rewards, chosen_r, **TOL)
    torch.testing.assert_close(ours.rejected_rewards, rejected_r, **TOL)


@HYP
@given(data=st.data(), n=st.integers(1, 8), beta=st.floats(0.01, 2.0), dw=st.floats(0.1, 3.0),
       uw=st.floats(0.1, 3.0))
def test_kto_equals_trl(data, n, beta, dw, uw):
    policy, ref, mask = data.draw(sequences(n))
    kl_policy, kl_ref, _ = data.draw(sequences(n))
    labels = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    kl_sums = kl_policy.detach().sum(1)
    trainer = _trainer(beta=beta, desirable_weight=dw, undesirable_weight=uw, loss_type="kto", calculate_KL=True,
                       precompute_ref_logps=True, _compute_kl_logps=lambda _model, _batch: kl_sums)
    batch = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
             "label": labels, "ref_logps": ref.sum(1), "ref_KL_logps": kl_ref.sum(1)}
    theirs = trl_kto.KTOTrainer._compute_loss(trainer, _model_returning(policy), batch, False)
    ours = kto_loss(policy.sum(1), ref.sum(1), labels, kl_sums, kl_ref.sum(1), beta=beta, desirable_weight=dw,
                    undesirable_weight=uw)
    torch.testing.assert_close(ours.loss, theirs, **TOL)
    torch.testing.assert_close(_grad(ours.loss, policy), _grad(theirs, policy), **TOL)
    logged = trainer._metrics["train"]
    assert ours.metrics["kl"] == pytest.approx(logged["kl"][-1], rel=1e-6, abs=1e-9)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        if logged[name]:
            assert ours.metrics[name] == pytest.approx(logged[name][-1], rel=1e-6, abs=1e-6)


def test_unknown_dpo_loss_is_named():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss 'sigmod'"):
        dpo_loss(x, x, x, x, loss_type="sigmod")
