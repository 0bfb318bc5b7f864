"""GRPO: the advantages and the clipped policy-gradient loss against TRL's GRPOTrainer on the same
completions and rewards (float64, losses and gradients), the reward functions, and short runs of
method: grpo (it trains, resumes exactly, stops on SIGTERM).

TRL computes the advantages inside GRPOTrainer._generate_and_score_completions and the loss in
_compute_loss, reading hyper-parameters and a few services from the trainer. The checks call those
unbound methods on a stand-in trainer that holds only those: its `_generate` hands back the fixed
completions, its `_calculate_rewards` the fixed rewards, its per-token log-probability method the
given log-probabilities."""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict, deque
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _runs import config, make_assets, metrics
from mistral_tune.config import RewardConfig
from mistral_tune.errors import ConfigError
from mistral_tune.train.loop import train
from mistral_tune.train.objectives import grpo_advantages, grpo_loss, grpo_normaliser

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

TOL = dict(rtol=1e-6, atol=1e-6)
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           reduce=lambda x, reduction="sum": x, process_index=0, num_processes=1,
                           unwrap_model=lambda m: m)


def _trainer(**hparams):
    """The attributes GRPOTrainer's methods read, and nothing of a model or a dataset."""
    model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    return SimpleNamespace(accelerator=_accelerator(), model=model,
                           _metrics=defaultdict(lambda: defaultdict(list)), use_vllm=False, aux_loss_enabled=False,
                           _entropy_bonus_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                           importance_sampling_level="token", current_gradient_accumulation_steps=1,
                           **hparams)


@st.composite
def rewards(draw):
    """(prompts x G, K) rewards; some failed (NaN), sometimes a whole completion's."""
    prompts, group, funcs = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    values = st.one_of(st.sampled_from([0.0, 1.0, 0.5, math.nan]), st.floats(-3, 3))
    flat = draw(st.lists(values, min_size=prompts * group * funcs, max_size=prompts * group * funcs))
    weights = draw(st.lists(st.floats(0.1, 2.0), min_size=funcs, max_size=funcs))
    table = torch.tensor(flat, dtype=torch.float64).view(prompts * group, funcs)
    return table, torch.tensor(weights, dtype=torch.float64), group


def trl_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    n = rewards_per_func.shape[0]
    trainer = _trainer(
        environment_factories=None, tools=None, environments=None, processing_class=None,
        _generate=lambda prompts: ([[5, 6]] * n, [[1, 2, 3]] * n, None, ["x"] * n, None, None, None, None),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(steps_per_generation=1, gradient_accumulation_steps=1, per_device_train_batch_size=n,
                             gradient_checkpointing_kwargs=None),
        num_iterations=1, beta=0.0, _calculate_rewards=lambda *_a: rewards_per_func, num_generations=group,
        multi_objective_aggregation="sum_then_normalize", reward_weights=weights, scale_rewards=scale,
        reward_func_names=[f"r{k}" for k in range(len(weights))],
        _logs={"prompt": deque(), "completion": deque(), "rewards": defaultdict(deque), "advantages": deque(),
               "extra": defaultdict(deque)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False)
    return trl_grpo.GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)["advantages"]


@HYP
@given(r=rewards(), scale=st.sampled_from(["group", "none"]))
def test_advantages_equal_trl(r, scale):
    rewards_per_func, weights, group = r
    ours, total, _ = grpo_advantages(rewards_per_func, weights, group, scale)
    torch.testing.assert_close(ours, trl_advantages(rewards_per_func, weights, group, scale), **TOL)
    assert torch.isnan(total).tolist() == torch.isnan(rewards_per_func).all(1).tolist()


@st.composite
def completions(draw):
    """(B, T) per-token log-probabilities of the policy, of the old policy and of the reference, the
    completion mask (right padding, every completion at least one token) and advantages."""
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    spread = draw(st.sampled_from([0.01, 0.3, 1.0]))  # how far the old policy is: some ratios clip
    policy = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 1e-3
    old = policy + torch.randn(b, t, generator=gen, dtype=torch.float64) * spread
    ref = policy + torch.randn(b, t, generator=gen, dtype=torch.float64) * spread
    advantages = torch.randn(b, generator=gen, dtype=torch.float64)
    return policy.requires_grad_(), old, ref, mask, advantages


@HYP
@given(c=completions(), loss_type=st.sampled_from(["grpo", "dapo", "dr_grpo"]), beta=st.sampled_from([0.0, 0.04, 0.5]),
       eps=st.floats(0.05, 0.4), eps_high=st.sampled_from([None, 0.28]), with_old=st.booleans())
def test_loss_equals_trl(c, loss_type, beta, eps, eps_high, with_old):
    policy, old, ref, mask, advantages = c
    b, t = mask.shape
    max_len = t + 3
    args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    high = eps if eps_high is None else eps_high
    trainer = _trainer(loss_type=loss_type, beta=beta, epsilon_low=eps, epsilon_high=high,
                       max_completion_length=max_len, args=args,
                       _get_per_token_logps_and_entropies=lambda *_a, **_k: (policy, torch.zeros_like(policy), None))
    inputs = {"prompt_ids": torch.ones(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.ones(b, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}
    if with_old:
        inputs["old_per_token_logps"] = old
    theirs = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    terms = grpo_loss(policy, old if with_old else None, ref, advantages, mask, beta, eps, eps_high, loss_type, max_len)
    ours = terms.summed / grpo_normaliser(loss_type, b, int(mask.sum()))
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(torch.autograd.grad(ours, policy)[0], torch.autograd.grad(theirs, policy)[0], **TOL)
    logged = trainer._metrics["train"]
    names = [("clip_ratio/low", "clip_ratio/low_mean"), ("clip_ratio/high", "clip_ratio/high_mean"),
             ("clip_ratio", "clip_ratio/region_mean")] + ([("kl", "kl")] if beta else [])
    for ours_name, theirs_name in names:
        total, count = terms.sums[ours_name]
        assert total / count == pytest.approx(logged[theirs_name][-1], rel=1e-6, abs=1e-9)


def test_unknown_loss_and_scaling_are_named():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown GRPO loss 'gspo'"):
        grpo_loss(x, None, None, torch.zeros(2), torch.ones(2, 3), loss_type="gspo")
    with pytest.raises(ValueError, match="unknown reward scaling 'batch'"):
        grpo_advantages(torch.zeros(4, 1), torch.ones(1), 2, "batch")


# ---------------------------------------------------------------------------------------------- runs
def flaky_reward(prompt, completion, record, word="stone"):
    """A user's reward that raises on some records (those whose prompt holds `word`)."""
    if word in prompt[-1]["content"]:
        raise RuntimeError(f"no {word} allowed")
    return float("a" in completion)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), n_records=40)


def _grpo_cfg(model, data, out, **grpo):
    rewards = [{"name": "regex", "args": {"pattern": "[aeiou][a-z]"}}, {"name": "exact_match"},
               {"function": "test_grpo:flaky_reward", "weight": 0.5}]
    return config(model, data, out, method="grpo", max_steps=4, save_steps=1, val_set_size=4, eval_steps=2,
                  lora_dropout=0.1, save_total_limit=10, learning_rate=5e-2,
                  grpo={"num_generations": 4, "max_new_tokens": 6, "rewards": rewards, **grpo})


@pytest.fixture(scope="module")
def grpo_run(assets, tmp_path_factory):
    model, data = assets
    cfg = _grpo_cfg(model, data, tmp_path_factory.mktemp("grpo") / "run", num_iterations=2, beta=0.1)
    lines: list[str] = []
    return cfg, train(cfg, echo=lines.append), lines


def test_a_grpo_run_logs_rewards_clipping_kl_and_timings(grpo_run):
    _, result, lines = grpo_run
    logged = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logged if "lr" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4] and result.adapter_dir.is_dir()
    rollouts = [x for x in steps if "rollout_s" in x]
    assert [x["step"] for x in rollouts] == [1, 3]  # num_iterations 2: a rollout serves two steps
    for name in ("reward", "reward_std", "rewards/regex/mean", "rewards/regex/std", "rewards/flaky_reward/failed",
                 "completion_length", "frac_reward_zero_std", "update_s"):
        assert name in rollouts[0], name
    assert all({"clip_ratio", "kl", "update_s"} <= set(x) for x in steps)
    assert any(x["grad_norm"] > 0 for x in steps)  # the groups' rewards differ: the policy moves
    assert steps[1]["kl"] > 0  # the adapter has moved from the base after a step
    evals = [x for x in logged if "eval_reward" in x]
    assert [x["step"] for x in evals] == [0, 2, 4]


def test_a_failing_reward_is_reported_with_its_record_and_counted(grpo_run):
    _, result, lines = grpo_run
    failed = [x for x in lines if "reward flaky_reward failed on" in x]
    assert failed and all(".jsonl:" in x and "RuntimeError: no stone allowed" in x and "test_grpo.py:" in x
                          and "counted as failed" in x for x in failed)
    written = [json.loads(x) for x in (result.output_dir / "reward_failures.jsonl").read_text().splitlines()]
    logged = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(written) == sum(x.get("rewards/flaky_reward/failed", 0) for x in logged) > 0


def test_a_grpo_run_resumes_exactly_between_the_steps_of_one_rollout(grpo_run, tmp_path):
    """Checkpoint 3 falls between the two steps of the second rollout: the rollout travels in it, and
    the seeds of later rollouts come from the step, so the resumed run repeats the same completions."""
    cfg, result, _ = grpo_run
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    state = json.loads((out / "checkpoint-3" / "state.json").read_text())
    assert state["grpo"] is not None and state["grpo"]["completions"]
    again = train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-3")}),
                  echo=lambda _: None)
    assert again.steps == 4
    assert metrics(out) == metrics(result.output_dir)
    mine = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert mine == (result.adapter_dir / "adapter_model.safetensors").read_bytes()


def test_grpo_config_errors_name_their_key(assets, tmp_path):
    model, data = assets
    with pytest.raises(ConfigError, match="grpo.rewards: empty"):
        config(model, data, tmp_path, method="grpo")
    with pytest.raises(ConfigError, match="not a built-in"):
        config(model, data, tmp_path, method="grpo", grpo={"rewards": [{"name": "exactmatch"}]})
    with pytest.raises(ConfigError, match="grpo: num_generations set, but method is sft"):
        config(model, data, tmp_path, grpo={"num_generations": 3})
    with pytest.raises(ConfigError, match=r"grpo.rewards.0.function: .*no function 'nope'"):
        train(_grpo_cfg(model, data, tmp_path / "bad") .model_copy(update={"grpo": _grpo_cfg(
            model, data, tmp_path).grpo.model_copy(update={"rewards": [RewardConfig(function="test_grpo:nope")]})}),
            echo=lambda _: None)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_sigterm_mid_run_checkpoints_and_resume_repeats_the_run(grpo_run, tmp_path):
    import os
    import signal

    from mistral_tune.train.loop import prepare, run_training

    cfg, result, _ = grpo_run
    out = tmp_path / "run"
    cfg = cfg.model_copy(update={"output_dir": str(out)})
    rt, model_dir, tokenizer, net, dataset = prepare(cfg)
    passes = []

    def term(module, args, output) -> None:  # SIGTERM in the middle of the second step's update
        if module.training and torch.is_grad_enabled():
            passes.append(1)
            if len(passes) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    saved = signal.getsignal(signal.SIGTERM)
    try:
        net.model.norm.register_forward_hook(term)
        stopped = run_training(cfg, rt, model_dir, tokenizer, net, dataset, echo=lambda _: None)
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert stopped.stopped_by == "SIGTERM" and stopped.steps == 2
    train(cfg.model_copy(update={"resume": "auto"}), echo=lambda _: None)
    assert metrics(out) == metrics(result.output_dir)


def test_rollouts_after_a_step_use_the_new_weights_not_keys_held_from_before(make_tiny_mistral):
    """The decoder keeps a finished prompt's keys for a later prompt with the same start; once a step
    has moved the weights (or the adapters are off), those keys are stale and must not be reused."""
    from mistral_tune.generate.decoder import _shared
    from mistral_tune.generate.run import generate_batch
    from mistral_tune.models.lora import LoraSpec, adapters_disabled, apply_lora

    model = make_tiny_mistral()
    apply_lora(model, LoraSpec(4, 8, 0.0, ["q_proj", "v_proj"]), seed=0)
    prompts = [[1, 5, 9, 13, 17, 21], [1, 5, 9, 13, 17, 40]]
    generate_batch(model, prompts, 6)  # keys of these prompts now held
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if "lora_B" in name else 0.0))  # in place, as an optimizer step
    held = generate_batch(model, prompts, 6)
    with adapters_disabled(model):
        base_held = generate_batch(model, prompts, 6)
    _shared.pop(model, None)
    assert held == generate_batch(model, prompts, 6)
    with adapters_disabled(model):
        _shared.pop(model, None)
        assert base_held == generate_batch(model, prompts, 6)
