"""Out of memory: one message with figures and fixes, or (auto_micro_batch) smaller micro-batches with
the same effective batch. On CPU the out-of-memory error is injected where a GPU would raise it."""

from __future__ import annotations

import shutil

import pytest
import torch

from _runs import config, make_assets, metrics
from mistral_tune.errors import OutOfMemory
from mistral_tune.models.mistral import MistralForCausalLM
from mistral_tune.train.checkpoint import CheckpointManager
from mistral_tune.train.loop import train
from mistral_tune.train.oom import smaller_micro_batch


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def memory_fits_one_row(monkeypatch):
    """The forward pass raises torch's out-of-memory error for micro-batches of more than one row."""
    real = MistralForCausalLM.token_loss
    seen = []

    def token_loss(model, batch):
        seen.append(batch.input_ids.shape[0])
        if batch.input_ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, batch)

    monkeypatch.setattr(MistralForCausalLM, "token_loss", token_loss)
    return seen


@pytest.mark.parametrize(("before", "after"), [
    ((4, 1), (2, 2)), ((2, 2), (1, 4)), ((6, 1), (3, 2)), ((3, 2), (1, 6)), ((1, 8), None)])
def test_smaller_micro_batch_keeps_the_effective_batch(before, after):
    assert smaller_micro_batch(*before) == after


def test_out_of_memory_is_one_message_with_figures_and_fixes(assets, tmp_path, memory_fits_one_row):
    model, data = assets
    with pytest.raises(OutOfMemory) as err:
        train(config(model, data, tmp_path / "run", micro_batch_size=4), echo=lambda _: None)
    msg = str(err.value)
    assert "\n" not in msg
    assert "out of memory on cpu at optimizer step 1 with micro_batch_size 4 x gradient_accumulation_steps 1" in msg
    assert " GiB of " in msg and "peak " in msg
    for fix in ("micro_batch_size: 2 with gradient_accumulation_steps: 2", "auto_micro_batch: true",
                "gradient_checkpointing: true", "adapter: qlora", "sequence_len: 32"):
        assert fix in msg
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_auto_micro_batch_halves_until_it_fits_and_matches_the_smaller_run(assets, tmp_path, memory_fits_one_row):
    model, data = assets
    echoed: list[str] = []
    cfg = config(model, data, tmp_path / "auto", micro_batch_size=4, max_steps=8, save_steps=4,
                 auto_micro_batch=True)
    result = train(cfg, echo=echoed.append)
    assert result.steps == 8
    assert [e.split(";")[1].strip() for e in echoed if e.startswith("out of memory")] == [
        "auto_micro_batch: retrying step 1 with micro_batch_size 2 x gradient_accumulation_steps 2",
        "auto_micro_batch: retrying step 1 with micro_batch_size 1 x gradient_accumulation_steps 4"]
    state = CheckpointManager.validate(tmp_path / "auto" / "checkpoint-4").state["progress"]
    assert (state["micro_batch_size"], state["gradient_accumulation_steps"]) == (1, 4)
    # Same rows per step, in micro-batches of one: the same numbers as a run configured that way.
    train(config(model, data, tmp_path / "small", micro_batch_size=1, gradient_accumulation_steps=4, max_steps=8,
                 save_steps=4), echo=lambda _: None)
    assert metrics(tmp_path / "auto") == metrics(tmp_path / "small")
    # A resumed run keeps the size that fit: no new out-of-memory round.
    shutil.rmtree(tmp_path / "auto" / "checkpoint-8")
    memory_fits_one_row.clear()
    again: list[str] = []
    train(cfg.model_copy(update={"resume": "auto"}), echo=again.append)
    assert set(memory_fits_one_row) == {1} and not any(e.startswith("out of memory") for e in again)
    assert metrics(tmp_path / "auto") == metrics(tmp_path / "small")


def test_out_of_memory_outside_the_retried_step_is_reported_too(assets, tmp_path, monkeypatch):
    """Evaluation is not retried with smaller batches; it still ends in the one-line report, not a traceback."""
    model, data = assets
    real = MistralForCausalLM.token_loss

    def token_loss(net, batch):
        if not net.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(net, batch)

    monkeypatch.setattr(MistralForCausalLM, "token_loss", token_loss)
    cfg = config(model, data, tmp_path / "run", val_set_size=8, max_steps=6, auto_micro_batch=True)
    with pytest.raises(OutOfMemory, match="out of memory on cpu at optimizer step 5 .* To fit, try: "):
        train(cfg, echo=lambda _: None)
