"""A run killed (SIGKILL), stopped (SIGTERM / SIGINT) or interrupted twice, then resumed: the metrics must
be the uninterrupted run's, line by line, bit for bit (CPU, one thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _runs import SRC, base_config, cli, config, make_assets, metrics, same_tensors, tensors, write_yaml
from mistral_tune.errors import EXIT_STOPPED
from mistral_tune.train import checkpoint as ckpt_mod
from mistral_tune.train import loop as loop_mod
from mistral_tune.train.checkpoint import CheckpointManager
from mistral_tune.train.loop import prepare, run_training, train
from mistral_tune.train.signals import StopRequest

STEPS, SAVE = 60, 10
SETTINGS = dict(max_steps=STEPS, save_steps=SAVE, eval_steps=25, val_set_size=8, lora_dropout=0.1,
                learning_rate=3e-3, save_total_limit=2)


@pytest.fixture(autouse=True)
def _sigterm_handler_restored():
    """A stop by SIGTERM leaves SIGTERM ignored in this process (by design); not for the next test."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _yaml(assets, root: Path, name: str) -> Path:
    model, data = assets
    return write_yaml(root / f"{name}.yaml", base_config(model, data, root / name, **SETTINGS))


def _last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _wait_for(predicate, proc, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.002)


def _finish(proc, expect_rc: int = 0) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == expect_rc, stderr[-2000:]
    return stdout


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted run, through the CLI like the interrupted ones; started here, run alongside them."""
    root = tmp_path_factory.mktemp("reference")
    proc = cli("train", str(_yaml(assets, root, "run")))

    def finished() -> Path:
        if proc.returncode is None:
            _finish(proc)
        return root / "run"

    yield finished
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_sigkill_then_resume_is_bit_identical(assets, reference, tmp_path):
    config_path = _yaml(assets, tmp_path, "run")
    out = tmp_path / "run"
    kill_at = random.Random().randint(SAVE + 1, STEPS // 2)  # any step after the first checkpoint
    proc = cli("train", str(config_path))
    _wait_for(lambda: _last_step(out) >= kill_at, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(out)
    assert killed_at < STEPS, "the run was not interrupted"
    resumed = cli("train", str(config_path), "resume=auto")
    stdout = _finish(resumed)
    reference = reference()
    got, want = metrics(out), metrics(reference)
    # line by line: every logged step and eval once, with the same loss, lr and grad norm (floats via JSON repr)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, want, strict=True):
        assert mine == theirs, f"killed after step {killed_at}, resumed: {mine} != {theirs}"
    assert same_tensors(tensors(out / "adapter" / "adapter_model.safetensors"),
                        tensors(reference / "adapter" / "adapter_model.safetensors"))
    assert f"trained {STEPS} steps" in stdout
    print(f"SIGKILL after step {killed_at} (target {kill_at}); {len(got)} metrics lines equal "
          f"({sum('loss' in r for r in got)} steps, {sum('eval_loss' in r for r in got)} evaluations)")


def test_sigterm_checkpoints_and_exits_with_the_stopped_code(assets, reference, tmp_path):
    """What a scheduler does before it preempts: SIGTERM, then (later) SIGKILL. The exit code is
    EXIT_STOPPED, not 0: `train && merge` must not merge a half-trained adapter."""
    config_path = _yaml(assets, tmp_path, "run")
    out = tmp_path / "run"
    proc = cli("train", str(config_path))
    _wait_for(lambda: _last_step(out) >= SAVE + 3, proc)
    os.kill(proc.pid, signal.SIGTERM)
    stdout = _finish(proc, expect_rc=EXIT_STOPPED)
    stopped_at = _last_step(out)
    assert stopped_at < STEPS
    assert f"stopped by SIGTERM after step {stopped_at}" in stdout
    assert f"to continue: mistral-tune train {config_path} resume=auto" in stdout
    CheckpointManager.validate(out / f"checkpoint-{stopped_at}")  # the step it was on, finished and saved
    assert not (out / "adapter").exists()
    _finish(cli("train", str(config_path), "resume=auto"))
    assert metrics(out) == metrics(reference())


def test_repeated_sigterm_still_stops_gracefully(assets, tmp_path):
    """Schedulers repeat SIGTERM. Here one every 2 ms from the first until the process has exited: during
    the step, the checkpoint save, the way out of the loop and the interpreter's shutdown."""
    config_path = _yaml(assets, tmp_path, "run")
    out = tmp_path / "run"
    proc = cli("train", str(config_path))
    _wait_for(lambda: _last_step(out) >= 3, proc)
    sent = 0

    def pester() -> None:
        nonlocal sent
        while proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # a zombie not yet reaped takes it without complaint
            sent += 1
            time.sleep(0.002)

    thread = threading.Thread(target=pester)
    thread.start()
    stdout = _finish(proc, expect_rc=EXIT_STOPPED)
    thread.join()
    stopped_at = _last_step(out)
    assert sent > 10 and f"stopped by SIGTERM after step {stopped_at}" in stdout
    CheckpointManager.validate(out / f"checkpoint-{stopped_at}")
    assert not (out / "adapter").exists()


def test_sigterm_while_the_final_adapter_is_written_lets_it_finish(assets, tmp_path, monkeypatch):
    """Two SIGTERMs while the last step's adapter is being saved: the run ends complete, nothing is killed."""
    model, data = assets
    leaked = []
    signal.signal(signal.SIGTERM, lambda *_: leaked.append("SIGTERM"))  # stands in for the default: death
    real_save = loop_mod.save_adapter

    def save_adapter(net, spec, directory, **kw):
        if Path(directory).name.startswith(".adapter.tmp"):  # the final adapter, not a checkpoint's
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(net, spec, directory, **kw)

    monkeypatch.setattr(loop_mod, "save_adapter", save_adapter)
    result = train(config(model, data, tmp_path / "run", max_steps=4), echo=lambda _: None)
    assert leaked == [] and result.stopped_by is None and result.steps == 4
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    CheckpointManager.validate(tmp_path / "run" / "checkpoint-4")


class _CtrlC:
    """Presses Ctrl-C (SIGINT to this process) during the forward pass of the n-th training step."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.steps = at_step, 0

    def __call__(self, module, args, output) -> None:
        if module.training:
            self.steps += 1
            if self.steps == self.at_step:
                os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(assets, tmp_path):
    model, data = assets
    cfg = config(model, data, tmp_path / "reference", max_steps=16, lora_dropout=0.1)
    train(cfg, echo=lambda _: None)
    out = tmp_path / "run"
    cfg = cfg.model_copy(update={"output_dir": str(out)})
    rt, model_dir, tokenizer, net, dataset = prepare(cfg)
    net.model.norm.register_forward_hook(_CtrlC(at_step=7))
    result = run_training(cfg, rt, model_dir, tokenizer, net, dataset, echo=lambda _: None)
    assert result.stopped_by == "SIGINT" and result.steps == 7
    assert result.checkpoint_dir == out / "checkpoint-7"
    CheckpointManager.validate(out / "checkpoint-7")
    train(cfg.model_copy(update={"resume": "auto"}), echo=lambda _: None)
    assert metrics(out) == metrics(tmp_path / "reference")


def test_second_ctrl_c_while_saving_quits_at_once_without_a_partial_checkpoint(assets, tmp_path, monkeypatch):
    """First Ctrl-C during a step; the second arrives while the stop checkpoint is being written."""
    model, data = assets
    out = tmp_path / "run"
    real_save = ckpt_mod.save_file

    def save_file(tensors_, filename, metadata=None):
        if filename.endswith("trainable.safetensors") and "-7.tmp" in filename:
            os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C
        return real_save(tensors_, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    cfg = config(model, data, out, max_steps=20, save_steps=5)
    rt, model_dir, tokenizer, net, dataset = prepare(cfg)
    net.model.norm.register_forward_hook(_CtrlC(at_step=7))
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, rt, model_dir, tokenizer, net, dataset, echo=lambda _: None)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-5"]
    CheckpointManager.validate(out / "checkpoint-5")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back


def test_stop_request_flags_the_first_signal_and_raises_on_the_second_ctrl_c():
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM keeps stopping gracefully
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this returns


def test_resume_auto_without_checkpoints_starts_fresh(assets, tmp_path):
    model, data = assets
    out = tmp_path / "run"
    out.mkdir()
    # left by a run of a version without the output marker, killed before its first save
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out / "config.yaml").write_text("{}\n")
    (out / "data_report.json").write_text("{}\n")
    echoed = []
    train(config(model, data, out, max_steps=3, resume="auto"), echo=echoed.append)
    assert any("no checkpoint" in e and "starting from step 0" in e for e in echoed)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


# Runs the CLI after wrapping one function of the trainer so that the process sends itself SIGTERM as the
# function returns: the signal lands at that exact point of the run (argv: OWNER FUNCTION -- CLI ARGS).
SIGNAL_AFTER = """
import os, signal, sys
from mistral_tune.cli import main
from mistral_tune.train import loop
owner = {"loop": loop, "Runtime": loop.Runtime}[sys.argv[1]]
real = getattr(owner, sys.argv[2])
def signalled(*args, **kwargs):
    result = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return result
setattr(owner, sys.argv[2], signalled)
sys.exit(main(sys.argv[3:]))
"""


def _cli_signalled_after(owner: str, function: str, *args: str):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SIGNAL_AFTER, owner, function, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigterm_while_the_run_loads_stops_before_the_first_step(assets, tmp_path):
    """SIGTERM once the model and data are loaded, before the loop: EXIT_STOPPED, no step taken, `to continue:`;
    the same again on a resumed run names the checkpoint it resumed from. Continuing finishes the run."""
    model, data = assets
    config_path = write_yaml(tmp_path / "run.yaml", base_config(model, data, tmp_path / "run", max_steps=8,
                                                                save_steps=4))
    stdout = _finish(_cli_signalled_after("loop", "prepare", "train", str(config_path)), EXIT_STOPPED)
    assert "stopped by SIGTERM after step 0 of 8; no step taken, nothing to save" in stdout
    assert f"to continue: mistral-tune train {config_path} resume=auto" in stdout
    assert metrics(tmp_path / "run") == [] and not (tmp_path / "run" / "adapter").exists()
    (tmp_path / "run.yaml").write_text(config_path.read_text().replace("max_steps: 8", "max_steps: 4"))
    _finish(cli("train", str(config_path), "resume=auto"))  # 4 steps and checkpoint-4, then 8 after a stop
    (tmp_path / "run.yaml").write_text(config_path.read_text().replace("max_steps: 4", "max_steps: 8"))
    stdout = _finish(_cli_signalled_after("loop", "prepare", "train", str(config_path), "resume=auto", "--force"),
                     EXIT_STOPPED)
    assert f"stopped by SIGTERM after step 4 of 8; checkpoint: {tmp_path / 'run' / 'checkpoint-4'}" in stdout
    assert "to continue: mistral-tune train" in stdout
    stdout = _finish(cli("train", str(config_path), "resume=auto", "--force"))
    assert "trained 8 steps" in stdout and [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [
        *range(1, 9)]


def test_sigterm_between_the_last_step_and_the_final_save_lets_the_save_finish(assets, tmp_path):
    """SIGTERM after the loop's last step, before the final adapter is written: it is written, exit 0."""
    model, data = assets
    config_path = write_yaml(tmp_path / "run.yaml", base_config(model, data, tmp_path / "run", max_steps=3))
    stdout = _finish(_cli_signalled_after("Runtime", "full_state_dict", "train", str(config_path)))
    assert "trained 3 steps" in stdout and "to continue" not in stdout
    assert "SIGTERM came after the last step: the run is complete" in stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    CheckpointManager.validate(tmp_path / "run" / "checkpoint-3")
