"""The bad-step guard: non-finite and spiking steps are skipped without touching weights or optimizer
state; streaks roll back to the last good checkpoint at a lower learning rate; too many rollbacks stop
the run with a report."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from _runs import base_config, config, make_assets, metrics, same_tensors, tensors, write_yaml
from mistral_tune.cli import main
from mistral_tune.errors import TrainingHalted
from mistral_tune.train import loop as loop_mod
from mistral_tune.train.guard import MIN_HISTORY, StepGuard
from mistral_tune.train.loop import prepare, run_training
from mistral_tune.train.optim import lr_factor
from mistral_tune.train.schedule import RowStream


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _guard(**kw) -> StepGuard:
    args = dict(zscore=6.0, window=16, rollback_after=3, max_rollbacks=2, lr_factor=0.5) | kw
    return StepGuard(**args)


def test_guard_flags_non_finite_loss_and_gradient_norm():
    g = _guard()
    assert "non-finite loss (nan)" == g.check(math.nan, 1.0)
    assert "non-finite loss (inf)" == g.check(math.inf, 1.0)
    assert "non-finite gradient norm (inf)" == g.check(2.0, math.inf)
    assert g.check(2.0, 1.0) is None


def test_spikes_are_judged_against_a_robust_window():
    g = _guard()
    rng = random.Random(0)
    history = [2.0 + rng.uniform(-0.05, 0.05) for _ in range(MIN_HISTORY - 1)]
    for i, loss in enumerate(history):
        g.record(i + 1, loss, 1.0, g.check(loss, 1.0))
    assert g.check(50.0, 1.0) is None  # too little history to judge yet
    g.record(MIN_HISTORY, 2.0, 1.0, None)
    assert "loss spike" in g.check(50.0, 1.0)
    assert g.check(2.1, 1.0) is None  # ordinary noise
    assert g.check(0.5, 1.0) is None  # a drop is never a spike
    g.record(MIN_HISTORY + 1, 2.0, 1.0, g.check(2.0, 1.0))
    # a skipped spike does not enter the window, so the next spike is caught as well
    g.record(MIN_HISTORY + 2, 50.0, 1.0, g.check(50.0, 1.0))
    assert "loss spike" in g.check(40.0, 1.0)
    assert _guard(zscore=None).check(1e6, 1.0) is None


def test_streaks_count_to_rollbacks_and_the_state_round_trips():
    g = _guard()
    for step in (5, 6):
        g.record(step, math.nan, 1.0, "non-finite loss (nan)")
    assert not g.needs_rollback and g.streak_start == 5
    g.record(7, math.nan, 1.0, "non-finite loss (nan)")
    assert g.needs_rollback and g.may_roll_back
    g.rolled_back(7, to_step=4)
    assert (g.rollbacks, g.lr_scale, g.consecutive, g.streak_start) == (1, 0.5, 0, None)
    copy = _guard()
    copy.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert copy.state_dict() == g.state_dict()
    g.rolled_back(9, to_step=4)
    assert not g.may_roll_back and g.lr_scale == 0.25


class Inject:
    """Poisons chosen training steps from the model's last norm: NaN/Inf in the activations (the batch's
    forward pass) or in the gradients flowing back. Counts training forward passes (one per step here)."""

    def __init__(self, steps, where: str, value: float) -> None:
        self.steps, self.where, self.value, self.calls = set(steps), where, value, 0

    def __call__(self, module, args, output):
        if not module.training:
            return None
        self.calls += 1
        if self.calls not in self.steps:
            return None
        if self.where == "activation":
            return output + self.value
        output.register_hook(lambda grad: grad * self.value)
        return None


def _run(cfg, inject: Inject | None = None):
    rt, model_dir, tokenizer, model, data = prepare(cfg)
    if inject is not None:
        model.model.norm.register_forward_hook(inject)
    echoed: list[str] = []
    result = run_training(cfg, rt, model_dir, tokenizer, model, data, echo=echoed.append)
    return result, echoed


@pytest.mark.parametrize(("where", "value", "reason"), [
    ("activation", math.nan, "non-finite loss (nan)"),
    ("activation", math.inf, "non-finite loss"),
    ("gradient", math.nan, "non-finite gradient norm (nan)"),
    ("gradient", math.inf, "non-finite gradient norm"),
])
def test_a_bad_step_is_skipped_and_changes_nothing(assets, tmp_path, where, value, reason):
    model, data = assets
    out = tmp_path / "run"
    cfg = config(model, data, out, max_steps=8, save_steps=1, save_total_limit=10)
    result, echoed = _run(cfg, Inject({6}, where, value))
    assert result.steps == 8
    logged = metrics(out)
    assert reason in logged[5]["skipped"] and logged[5]["step"] == 6
    assert not any("skipped" in r for i, r in enumerate(logged) if i != 5)
    if where == "activation":
        assert logged[5]["loss"] is None  # non-finite values are written as null (strict JSON)
    else:
        assert logged[5]["grad_norm"] is None and math.isfinite(logged[5]["loss"])
    assert any("step 6: skipped" in e for e in echoed)
    ck = {s: out / f"checkpoint-{s}" for s in (5, 6, 7)}
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert same_tensors(tensors(ck[5] / name), tensors(ck[6] / name)), name  # step 6 changed nothing
        assert not same_tensors(tensors(ck[6] / name), tensors(ck[7] / name)), name  # step 7 trained


def test_a_poisoned_batch_with_extreme_labels_is_skipped_as_a_spike(assets, tmp_path):
    """40 copies of one short conversation and one whose answer is a run of unrelated words: once the
    model has learned the short answer, the poisoned sample's loss is a spike."""
    model, _ = assets
    good = {"messages": [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "hello"}]}
    words = "quartz zephyr obelisk marmalade xylophone kumquat fjord gryphon pumpernickel quixotic".split()
    rng = random.Random(0)
    poison = {"messages": [{"role": "user", "content": "Say hello"},
                           {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(15))}]}
    data = tmp_path / "poisoned.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good] * 40 + [poison]) + "\n")
    # a seed whose shuffle puts the poisoned sample (index 40) after the guard has history
    seed = next(s for s in range(100) if 16 <= RowStream([[i] for i in range(41)], s).order(0).index(40) <= 22)
    at = RowStream([[i] for i in range(41)], seed).order(0).index(40) + 1
    settings = dict(adapter="none", sample_packing=False, micro_batch_size=1, sequence_len=128, seed=seed,
                    learning_rate=1e-2, lr_scheduler="constant", warmup_steps=0, max_steps=at + 2, save_steps=None,
                    bad_step_window=8, cleaning={"dedup": False})  # the 40 copies are the point here
    _run(config(model, data, tmp_path / "guarded", **settings))
    logged = metrics(tmp_path / "guarded")
    assert [r["step"] for r in logged if "skipped" in r] == [at]
    assert "loss spike" in logged[at - 1]["skipped"] and logged[at - 1]["trained_tokens"] > 10
    _run(config(model, data, tmp_path / "unguarded", **settings, bad_step_zscore=None))
    unguarded = metrics(tmp_path / "unguarded")
    assert not any("skipped" in r for r in unguarded)
    assert unguarded[at - 1]["loss"] > 10 * max(r["loss"] for r in unguarded[at - 4:at - 1])


def test_a_streak_rolls_back_to_the_last_good_checkpoint_at_a_lower_lr(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    cfg = config(model, data, out, max_steps=14, save_steps=5, save_total_limit=10,
                 bad_step_rollback_after=2, bad_step_lr_factor=0.25)
    result, echoed = _run(cfg, Inject({9, 10}, "gradient", math.inf))
    assert result.steps == 14
    lines = metrics(out)
    assert [r["step"] for r in lines if "skipped" in r] == [9, 10]
    assert {"step": 10, "event": "rollback"} == {k: v for k, v in lines[10].items() if k in ("step", "event")}
    assert any("rolled back to checkpoint-5" in e for e in echoed)
    # checkpoint-10 is written after the rollback: it holds exactly checkpoint-5's weights and optimizer state
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert same_tensors(tensors(out / "checkpoint-5" / name), tensors(out / "checkpoint-10" / name)), name
    for r in lines:
        if "lr" in r:
            factor = lr_factor(r["step"] - 1, 14, 3, "cosine")
            assert r["lr"] == pytest.approx(1e-2 * factor * (0.25 if r["step"] > 10 else 1.0), rel=1e-12)


def test_too_many_rollbacks_stop_the_run_with_a_report(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    cfg = config(model, data, out, max_steps=30, save_steps=5, bad_step_rollback_after=2, bad_step_max_rollbacks=2)
    with pytest.raises(TrainingHalted) as err:
        _run(cfg, Inject(range(7, 100), "activation", math.nan))
    msg = str(err.value)
    assert "stopped at step 12 after 2 bad steps in a row" in msg and "2 rollback(s) did not help" in msg
    assert "6 skipped step(s) (6 non-finite loss)" in msg and "at step 8 to step 5, at step 10 to step 5" in msg
    report = json.loads(Path(out / "guard_report.json").read_text())
    assert [e["step"] for e in report["events"] if "skipped" in e] == [7, 8, 9, 10, 11, 12]
    assert not (out / "adapter").exists()


def test_the_command_exits_with_the_guards_code_and_says_how_to_continue(assets, tmp_path, capsys, monkeypatch):
    """Every step from the 3rd NaN: the guard halts the run; the command exits with TrainingHalted's own
    code (not 2, a config error, and not 0) and prints the command that continues."""
    model, data = assets
    path = write_yaml(tmp_path / "run.yaml", base_config(model, data, tmp_path / "run", max_steps=12, save_steps=2,
                                                         bad_step_rollback_after=2, bad_step_max_rollbacks=0))
    real = loop_mod.prepare

    def poisoned(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded[3].model.norm.register_forward_hook(Inject(range(3, 100), "activation", math.nan))
        return loaded

    monkeypatch.setattr(loop_mod, "prepare", poisoned)
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == TrainingHalted.exit_code == 4, err
    assert err.count("\n") == 1 and "stopped at step 4 after 2 bad steps in a row" in err
    assert f"continue from the last checkpoint once the cause is fixed: mistral-tune train {path} resume=auto" in err
    assert not (tmp_path / "run" / "adapter").exists()


def test_grpo_steps_are_not_judged_by_the_size_of_their_loss() -> None:
    """GRPO's loss sits near zero (advantages normalised per group): the spike test would skip every step
    that carries a signal. Its guard keeps only the non-finite checks."""
    from types import SimpleNamespace

    from mistral_tune.train.guard import StepGuard

    keys = dict(bad_step_zscore=8.0, bad_step_window=50, bad_step_rollback_after=3, bad_step_max_rollbacks=2,
                bad_step_lr_factor=0.5)
    sft, grpo = (StepGuard.from_config(SimpleNamespace(method=m, **keys)) for m in ("sft", "grpo"))
    for guard in (sft, grpo):
        guard.recent.extend([1e-9 * (i % 3) for i in range(20)])
    assert sft.check(0.006, 1.0) is not None and grpo.check(0.006, 1.0) is None
    assert grpo.check(float("nan"), 1.0) == "non-finite loss (nan)"
