"""Several processes (torchrun, gloo on CPU): the same maths as one process, every row once per epoch,
ranks that agree, robust aggregation against faulty workers, and a killed worker restarted exactly.

Each torchrun launch costs a few seconds of Python start-up per process on a small machine, so runs
that need no signal share a launch (tests/dist_worker.py) and independent launches run side by side."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from _runs import SRC, base_config, cli, make_assets, metrics, same_tensors, tensors, write_yaml
from mistral_tune.config import config_from_dict
from mistral_tune.errors import EXIT_STOPPED, CheckpointError, ConfigError
from mistral_tune.quickstart import create_tiny_model
from mistral_tune.train.checkpoint import CheckpointManager
from mistral_tune.train.faults import parse_faults
from mistral_tune.train.loop import train
from mistral_tune.train.runtime import aggregate, check_distributed_config, resolve_reshard
from mistral_tune.train.schedule import RowStream

TESTS = Path(__file__).resolve().parent


def torchrun(n: int, *args: str, restarts: int = 0, env: dict | None = None) -> subprocess.Popen:
    """n gloo processes on this machine through PyTorch's launcher, on these sources, one thread each."""
    full_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", *args]
    # A session of its own: a test that gives up on it kills the launcher and every worker (kill_all).
    return subprocess.Popen(cmd, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def assert_same_evaluations(run: Path, reference: Path, key: str) -> list[dict]:
    """The evaluation lines (those holding `key`) of two runs' metrics.jsonl: at steps 2 and 4 both, with
    the same figures (1e-5 relative). Returns run's."""
    def evaluations(out: Path) -> list[dict]:
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in lines if key in r]

    got, want = evaluations(run), evaluations(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for mine, theirs in zip(got, want, strict=True):
        assert mine.keys() == theirs.keys()
        for k, v in theirs.items():
            assert mine[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    return got


def kill_all(proc: subprocess.Popen) -> None:
    """The launcher and its workers, so that a hung run leaves no process behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def train_cli(n: int, config: Path, *overrides: str, restarts: int = 0) -> subprocess.Popen:
    return torchrun(n, "-m", "mistral_tune", "train", str(config), *overrides, restarts=restarts)


def finish(proc: subprocess.Popen, expect_rc: int = 0, timeout: float = 300) -> tuple[str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    assert proc.returncode == expect_rc, f"rc {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, stderr


def workers(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started."""
    found = {}
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[ranks[0]] = pid
    return found


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended too early: {proc.communicate()}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


# ---------------------------------------------------------------------- the rows each process takes


@settings(max_examples=200, deadline=None)
@given(n_rows=st.integers(1, 40), size=st.integers(1, 5), world=st.integers(1, 5), seed=st.integers(0, 1000))
def test_every_process_count_trains_the_one_process_rows_and_each_row_once_per_epoch(n_rows, size, world, seed):
    rows = [[i] for i in range(n_rows)]
    one = RowStream(rows, seed)
    streams = [RowStream(rows, seed, rank, world) for rank in range(world)]
    chunks_per_epoch = math.ceil(n_rows / size)
    seen = [0] * n_rows
    for _ in range(chunks_per_epoch):  # world epochs: chunks_per_epoch rounds of `world` micro-batches
        step = [r[0] for s in streams for _, g in [s.next(size)] for r in g]
        expected = [r[0] for _ in range(world) for r in one.next(size)[1]]
        assert sorted(step) == sorted(expected)  # the same rows as one process with world x the accumulation
        for i in step:
            seen[i] += 1
    assert seen == [world] * n_rows  # world epochs: every row exactly `world` times, none dropped
    assert all((s.epoch, s.offset) == (world, 0) for s in streams)


# ---------------------------------------------------------------------- 1, 2 and 4 processes


SAME_BATCH = dict(max_steps=6, micro_batch_size=3, save_steps=3, eval_steps=2, val_set_size=4, warmup_steps=2)


@pytest.fixture(scope="module")
def same_batch(assets, tmp_path_factory):
    """The same global batch (micro-batch 3 x accumulation x processes = 12 rows; epochs end mid-step, with
    a one-row micro-batch) trained by 1 (in this process), 2 and 4 gloo processes: {world: output_dir}."""
    model, data = assets
    root = tmp_path_factory.mktemp("same_batch")
    launches = {}
    for world in (2, 4):
        cfg = base_config(model, data, root / f"w{world}", gradient_accumulation_steps=4 // world, **SAME_BATCH)
        launches[world] = train_cli(world, write_yaml(root / f"w{world}.yaml", cfg))
    one = config_from_dict(base_config(model, data, root / "w1", gradient_accumulation_steps=4, **SAME_BATCH))
    train(one, echo=lambda *_: None)
    for proc in launches.values():
        stdout, _ = finish(proc)
        assert stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    return {1: root / "w1", 2: root / "w2", 4: root / "w4"}


def assert_same_steps(out: Path, reference: Path) -> float:
    """Every metrics line of `out` equals `reference`'s, losses within 1e-6 relative; the final adapters
    within 1e-5. Returns the largest relative loss difference."""
    got, want = metrics(out), metrics(reference)
    assert [r["step"] for r in want if "loss" in r] == list(range(1, 7))
    assert len(got) == len(want)
    worst = 0.0
    for mine, theirs in zip(got, want, strict=True):
        assert mine.keys() == theirs.keys()
        for key in ("step", "epoch", "lr", "trained_tokens"):
            assert mine.get(key) == theirs.get(key), (mine, theirs)
        for key in ("loss", "eval_loss"):
            if key in mine:
                rel = abs(mine[key] - theirs[key]) / abs(theirs[key])
                worst = max(worst, rel)
                assert rel <= 1e-6, (key, mine, theirs)
        if "grad_norm" in mine:  # summed, not averaged, over processes (AdamW alone would hide a factor)
            assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-4 * theirs["grad_norm"], (mine, theirs)
    mine, theirs = (tensors(d / "adapter" / "adapter_model.safetensors") for d in (out, reference))
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-5)
    return worst


def test_one_two_and_four_processes_give_the_same_steps(same_batch):
    """Per-step and held-out losses within 1e-6 relative, checkpoints at the same steps (every 3, and at
    each epoch's end), final adapters within 1e-5."""
    worst = max(assert_same_steps(same_batch[w], same_batch[1]) for w in (2, 4))
    for world in (2, 4):
        assert ([p.name for p in CheckpointManager(same_batch[world], 9).checkpoints()]
                == [p.name for p in CheckpointManager(same_batch[1], 9).checkpoints()])
    print(f"largest relative loss difference over 1/2/4 processes: {worst:.2e}")


def test_resume_on_fewer_processes_four_then_two_then_one(same_batch, tmp_path):
    """A 4-process run's checkpoint at step 3 goes on with 2 processes (accumulation 1 -> 2), whose checkpoint
    at step 5 goes on with 1 process (2 -> 4): the same rows per step, the same steps as one process."""
    cfg = yaml.safe_load((same_batch[4] / "config.yaml").read_text())
    two = write_yaml(tmp_path / "two.yaml", {**cfg, "output_dir": str(tmp_path / "two"),
                                             "resume": str(same_batch[4] / "checkpoint-3")})
    stdout, _ = finish(train_cli(2, two))
    assert "gradient_accumulation_steps 1 -> 2, the same 12 rows per step" in stdout
    echoed = []
    one = config_from_dict({**cfg, "output_dir": str(tmp_path / "one"),
                            "resume": str(tmp_path / "two" / "checkpoint-5")})
    train(one, echo=echoed.append)
    assert any("gradient_accumulation_steps 2 -> 4, the same 12 rows per step" in e for e in echoed)
    print(f"largest relative loss difference 4 -> 2 -> 1: {assert_same_steps(tmp_path / 'one', same_batch[1]):.2e}")


def test_pissa_on_two_processes_takes_the_one_process_steps(assets, tmp_path):
    """PiSSA's starting factors and residual base weights are rank 0's on every process: two processes
    train the one-process steps."""
    model, data = assets
    outs = {w: tmp_path / f"w{w}" for w in (1, 2)}
    cfg = {w: base_config(model, data, outs[w], gradient_accumulation_steps=4 // w, lora_init="pissa", **SAME_BATCH)
           for w in (1, 2)}
    proc = train_cli(2, write_yaml(tmp_path / "w2.yaml", cfg[2]))
    train(config_from_dict(cfg[1]), echo=lambda *_: None)
    finish(proc)
    assert_same_steps(outs[2], outs[1])


# ---------------------------------------------------------------------- sharded full fine-tuning (FSDP2)

FULL = dict(SAME_BATCH, adapter="none", learning_rate=1e-3, gradient_checkpointing=True)


def test_sharded_full_finetuning_takes_the_one_process_steps_and_resumes_on_either(assets, tmp_path):
    """Full fine-tuning on 2 gloo processes (distributed: auto -> FSDP2, checkpointed layers): the same steps
    as one process, a sharded checkpoint (one file of rows per process) that one process resumes, and one
    process's checkpoint that two sharded processes resume: all within 1e-6 of the one-process run."""
    model, data = assets
    two = write_yaml(tmp_path / "two.yaml", base_config(model, data, tmp_path / "two", gradient_accumulation_steps=2,
                                                        **FULL))
    launch = train_cli(2, two)
    one_cfg = base_config(model, data, tmp_path / "one", gradient_accumulation_steps=4, **FULL)
    train(config_from_dict(one_cfg), echo=lambda *_: None)
    finish(launch)
    manifest = json.loads((tmp_path / "two" / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["format"] == "mistral-tune-checkpoint-sharded/1"
    assert sorted(f for f in manifest["files"] if f.startswith("shard-")) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    # one process's checkpoint, resumed sharded on two; the sharded checkpoint, resumed on one
    cfg_two = yaml.safe_load(two.read_text())
    resumed_two = write_yaml(tmp_path / "r2.yaml", {**one_cfg, "output_dir": str(tmp_path / "r2"),
                                                    "resume": str(tmp_path / "one" / "checkpoint-3")})
    launch = train_cli(2, resumed_two)
    train(config_from_dict({**cfg_two, "output_dir": str(tmp_path / "r1"),
                            "resume": str(tmp_path / "two" / "checkpoint-3")}), echo=lambda *_: None)
    finish(launch)
    for out in ("two", "r1", "r2"):
        got, want = metrics(tmp_path / out), metrics(tmp_path / "one")
        assert len(got) == len(want)
        for mine, theirs in zip(got, want, strict=True):
            for key in ("loss", "eval_loss"):
                if key in mine:
                    assert abs(mine[key] - theirs[key]) <= 1e-6 * abs(theirs[key]), (out, mine, theirs)
            if "grad_norm" in mine:  # FSDP's reductions are sums, as the token normalisation needs
                assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-4 * theirs["grad_norm"], (out, mine)
        mine, theirs = (tensors(tmp_path / d / "model" / "model.safetensors") for d in (out, "one"))
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-5)
    # a damaged shard is found by the checksums, naming the file
    shard = tmp_path / "two" / "checkpoint-6" / "shard-00002-model-00001-of-00001.safetensors"
    data_ = bytearray(shard.read_bytes())
    data_[-1] ^= 1
    shard.write_bytes(bytes(data_))
    with pytest.raises(CheckpointError, match="shard-00002-model-00001-of-00001.safetensors: SHA-256"):
        CheckpointManager.validate(shard.parent)


def test_what_sharding_does_not_support_is_refused_up_front(assets, tmp_path):
    model, data = assets
    cfg = config_from_dict(base_config(model, data, tmp_path / "r", distributed="fsdp"))
    with pytest.raises(ConfigError, match="distributed: fsdp with adapter: lora is not supported yet"):
        check_distributed_config(cfg, 2)
    check_distributed_config(cfg, 1)  # one process shards nothing
    full = cfg.model_copy(update={"adapter": "none", "distributed": "auto", "auto_micro_batch": True})
    with pytest.raises(ConfigError, match="auto_micro_batch with distributed: fsdp is not supported"):
        check_distributed_config(full, 2)
    evals = config_from_dict(base_config(model, data, tmp_path / "r", adapter="none", eval={
        "forgetting": {"dataset": {"path": str(data)}, "lm_eval_tasks": ["hellaswag"]}}))
    with pytest.raises(ConfigError, match="eval.forgetting.lm_eval_tasks with distributed: fsdp is not supported"):
        check_distributed_config(evals, 2)
    check_distributed_config(evals.model_copy(update={"eval": evals.eval.model_copy(update={"forgetting": None})}), 2)
    # bitsandbytes' 8-bit update takes plain tensors only (test_optim8bit checks that it fails on DTensor)
    eight = full.model_copy(update={"auto_micro_batch": False, "optimizer": "adamw_8bit"})
    with pytest.raises(ConfigError, match="optimizer: adamw_8bit with distributed: fsdp is not supported"):
        check_distributed_config(eight, 2)
    check_distributed_config(eight.model_copy(update={"distributed": "ddp"}), 2)


# ---------------------------------------------------------------------- agreeing, failing, restarting

KILL_RUN = dict(max_steps=9, save_steps=3, lora_dropout=0.1, eval_steps=5, val_set_size=4, resume="auto")


@pytest.fixture(scope="module")
def two_process_reference(assets, tmp_path_factory):
    """An uninterrupted 2-process run (LoRA dropout on, so each rank's random stream matters), started here
    with `mistral-tune train --gpus 2` and run alongside the interrupted ones."""
    root = tmp_path_factory.mktemp("reference")
    model, data = assets
    proc = cli("train", str(write_yaml(root / "run.yaml", base_config(model, data, root / "run", **KILL_RUN))),
               "--gpus", "2")

    def finished() -> Path:
        if proc.returncode is None:
            finish(proc)
        return root / "run"

    yield finished
    if proc.poll() is None:
        kill_all(proc)
        proc.communicate()


def test_a_worker_killed_with_sigkill_is_restarted_and_the_run_is_the_uninterrupted_one(
        assets, two_process_reference, tmp_path):
    """torchrun --max-restarts 1: kill -9 rank 1 mid-run; torchrun restarts both workers, resume: auto takes
    the newest valid checkpoint, and the metrics and the adapter equal the uninterrupted run's bit for bit."""
    model, data = assets
    out = tmp_path / "run"
    proc = train_cli(2, write_yaml(tmp_path / "run.yaml", base_config(model, data, out, **KILL_RUN)), restarts=1)
    wait_for(lambda: last_step(out) >= 4, proc)
    os.kill(workers(proc)[1], signal.SIGKILL)
    killed_at = last_step(out)
    stdout, stderr = finish(proc)
    assert killed_at < 9 and "resumed from" in stdout
    reference = two_process_reference()
    assert metrics(out) == metrics(reference)
    assert same_tensors(tensors(out / "adapter" / "adapter_model.safetensors"),
                        tensors(reference / "adapter" / "adapter_model.safetensors"))
    print(f"rank 1 killed after step {killed_at}; restarted run equals the uninterrupted one")


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(assets, two_process_reference, tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish the step, rank 0 writes that step's checkpoint, both exit with
    EXIT_STOPPED, which torchrun (the launcher here) reports as failed workers: it exits 1, not 0."""
    model, data = assets
    out = tmp_path / "run"
    proc = train_cli(2, write_yaml(tmp_path / "run.yaml", base_config(model, data, out, **KILL_RUN)))
    wait_for(lambda: last_step(out) >= 4, proc)
    os.kill(workers(proc)[1], signal.SIGTERM)
    stdout, stderr = finish(proc, expect_rc=1)
    stopped_at = last_step(out)
    assert stopped_at < 9 and f"exitcode  : {EXIT_STOPPED}" in stderr
    assert f"stopped by a stop request to another process after step {stopped_at} of 9" in stdout
    CheckpointManager.validate(out / f"checkpoint-{stopped_at}")
    assert metrics(out) == metrics(two_process_reference())[:len(metrics(out))]


def test_a_killed_worker_without_restarts_ends_the_run_promptly(assets, tmp_path):
    """`mistral-tune train --gpus 2`, no restarts: rank 1 killed; rank 0 does not wait for it (it stops with
    a message) and the command exits non-zero with one line naming the killed rank."""
    model, data = assets
    out = tmp_path / "run"
    config_path = write_yaml(tmp_path / "run.yaml", base_config(model, data, out, **KILL_RUN))
    proc = cli("train", str(config_path), "--gpus", "2")
    wait_for(lambda: last_step(out) >= 2, proc)
    os.kill(workers(proc)[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = finish(proc, expect_rc=2, timeout=120)
    elapsed = time.monotonic() - killed
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert "process(es) failed: " in line and "rank 1 (killed by SIGKILL)" in line
    assert line.endswith("each one's message is above")
    assert elapsed < 20, f"{elapsed:.0f} s after the kill"
    print(f"launcher exited {elapsed:.1f} s after rank 1 was killed")


# ---------------------------------------------------------------------- faulty workers

ROBUST_TOLERANCE = 0.01  # relative distance of each step's loss from the clean run's
FIVE = {  # name: (config settings, injected faults); all on five processes in one launch
    "clean": ({}, ""),
    "mean_noise": ({}, "1:noise"),
    "mean_nan": ({}, "1:nan,3:scale"),
    "median_scale": ({"gradient_aggregation": "median", "byzantine_tolerance": 1}, "1:scale"),
    "trimmed_flip_scale": ({"gradient_aggregation": "trimmed_mean", "byzantine_tolerance": 2}, "1:signflip,3:scale"),
    "clip_noise_nan": ({"gradient_aggregation": "centered_clip", "byzantine_tolerance": 2}, "2:noise,4:nan"),
    "median_scale_noise": ({"gradient_aggregation": "median", "byzantine_tolerance": 2}, "0:scale,3:noise"),
    # rank 2 runs out of memory with 2-row micro-batches; every rank retries with 1 row x accumulation 2
    "oom": ({"micro_batch_size": 2, "auto_micro_batch": True}, "2:oom"),
    "small": ({"gradient_accumulation_steps": 2}, ""),
    # rank 4 sends NaN from step 3: two bad steps, a rollback to checkpoint-2 on every rank, two more, a stop
    "rollback": ({"save_steps": 2, "bad_step_rollback_after": 2, "bad_step_max_rollbacks": 1}, "4:nan@3"),
}


@pytest.fixture(scope="module")
def five(assets, tmp_path_factory):
    """The FIVE runs, 6 steps of one-row micro-batches each: {name: (outcome, metrics lines)}."""
    model, data = assets
    root = tmp_path_factory.mktemp("five")
    args = []
    for name, (settings_, faults) in FIVE.items():
        cfg = base_config(model, data, root / name, **{"max_steps": 6, "micro_batch_size": 1, "save_steps": None,
                                                       "warmup_steps": 2, **settings_})
        args.append(f"{write_yaml(root / f'{name}.yaml', cfg)}@{faults}")
    finish(torchrun(5, str(TESTS / "dist_worker.py"), str(root / "results.json"), *args))
    results = {Path(k).stem: v for k, v in json.loads((root / "results.json").read_text()).items()}
    runs = {}
    for name in FIVE:
        lines = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (results[name], lines)
        losses = " ".join(f"{r['loss']:.4f}" for r in lines if "loss" in r)
        print(f"{name:20} {results[name][:50]:50} {losses}")
    return runs


def test_robust_aggregation_withstands_one_and_two_faulty_processes(five):
    """Five gloo processes; one or two send gradients x1e4, sign-flipped, NaN or noise. Robust aggregation
    keeps every step's loss within 1% of the clean run's, learns at least 80% of what it learns, and names
    the faulty ranks; mean does not."""
    losses = {name: [r["loss"] for r in lines if "loss" in r] for name, (_, lines) in five.items()}
    for name in ("clean", "mean_noise", "mean_nan", "median_scale", "trimmed_flip_scale", "clip_noise_nan",
                 "median_scale_noise"):
        lines = five[name][1]
        steps = [r for r in lines if "loss" in r]
        faults = FIVE[name][1]
        loud = sorted(int(p.split(":")[0]) for p in faults.split(",") if p and not p.endswith("signflip"))
        # Every step names the ranks whose gradient is far out (a sign flip of a small gradient need not be);
        # after three such steps each is reported once by name.
        assert all(set(loud) <= set(r.get("outlier_ranks", [])) for r in steps), (name, steps)
        assert sorted(r["rank"] for r in lines if r.get("event") == "outlier_rank") == (loud if len(steps) >= 3 else [])
    clean = losses["clean"]
    learned = lambda curve: (clean[0] - curve[-1]) / (clean[0] - clean[-1])  # noqa: E731
    for name in ("median_scale", "trimmed_flip_scale", "clip_noise_nan", "median_scale_noise"):
        assert five[name][0] == "ok"
        assert all(abs(a - b) <= ROBUST_TOLERANCE * b for a, b in zip(losses[name], clean, strict=True)), name
        assert learned(losses[name]) > 0.8, name  # it learns what the clean run learns
    # Mean is steered: noise from one rank undoes the learning; a NaN gradient makes every step a bad step
    # until the guard stops the run.
    assert five["mean_noise"][0] == "ok" and learned(losses["mean_noise"]) < 0.2
    assert five["mean_nan"][0].startswith("stopped at step 5 after 5 bad steps in a row")


def test_an_out_of_memory_on_one_rank_is_retried_by_every_rank(five):
    """Rank 2 alone runs out of memory at step 1; all five retry that step with 1-row micro-batches x 2 and
    go on like that: every step equals the run configured that way (losses within 1e-6 relative)."""
    assert five["oom"][0] == "ok"
    got, want = ([r for r in five[name][1] if "loss" in r] for name in ("oom", "small"))
    assert len(got) == len(want) == 6
    for mine, theirs in zip(got, want, strict=True):
        assert mine["trained_tokens"] == theirs["trained_tokens"]
        assert abs(mine["loss"] - theirs["loss"]) <= 1e-6 * theirs["loss"]


def test_a_bad_step_streak_is_rolled_back_and_stopped_together(five):
    outcome, lines = five["rollback"]
    assert [r["step"] for r in lines if r.get("skipped")] == [3, 4, 5, 6]
    assert [(r["step"], r["to_checkpoint"]) for r in lines if r.get("event") == "rollback"] == [(4, "checkpoint-2")]
    assert outcome.startswith("stopped at step 6 after 2 bad steps in a row: 1 rollback(s) did not help")


@settings(max_examples=100, deadline=None)
@given(honest=st.integers(1, 6), faulty=st.integers(0, 2), n=st.integers(1, 20), seed=st.integers(0, 10_000),
       method=st.sampled_from(["median", "trimmed_mean"]), scale=st.sampled_from([1e4, -1e4, math.nan, math.inf]))
def test_median_and_trimmed_mean_stay_within_the_honest_values(honest, faulty, n, seed, method, scale):
    """Whatever up to f = byzantine_tolerance processes send (huge, sign-flipped, NaN, inf), each coordinate
    of the aggregate lies between the smallest and largest honest value of that coordinate."""
    gen = torch.Generator().manual_seed(seed)
    good = torch.randn(honest + faulty, n, generator=gen)[:honest]
    bad = torch.randn(faulty, n, generator=gen) * scale
    rows = torch.cat([good, bad])[torch.randperm(honest + faulty, generator=gen)]
    if honest + faulty < 2 * faulty + 1:
        return  # the run refuses this world size (test below)
    mean, distances = aggregate(rows, method, faulty)
    lo, hi = good.min(dim=0).values, good.max(dim=0).values
    assert bool(((mean >= lo - 1e-6) & (mean <= hi + 1e-6)).all())
    assert len(distances) == honest + faulty


def test_centered_clipping_bounds_a_huge_gradient():
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(4, 1000, generator=gen) * 0.1 + 1.0
    clean, _ = aggregate(honest, "centered_clip", 1)
    with_fault, distances = aggregate(torch.cat([honest, honest[:1] * -1e4]), "centered_clip", 1)
    assert float((with_fault - clean).norm()) < 0.5 * float(clean.norm())  # the x1e4 row moves it little
    assert max(distances) == distances[-1] and distances[-1] > 100 * sorted(distances)[2]


def test_more_non_finite_gradients_than_the_tolerance_give_nan_for_the_guard():
    rows = torch.ones(5, 3)
    rows[1, 0] = rows[3, 2] = math.nan
    mean, distances = aggregate(rows, "median", 1)
    assert bool(mean.isnan().all()) and distances == [0.0, math.inf, 0.0, math.inf, 0.0]


def test_robust_aggregation_needs_enough_processes_and_adapters(assets, tmp_path):
    model, data = assets
    cfg = config_from_dict(base_config(model, data, tmp_path / "r", gradient_aggregation="median",
                                       byzantine_tolerance=2))
    check_distributed_config(cfg, 5)
    with pytest.raises(ConfigError, match="tolerance: 2 needs at least 5 processes .2f \\+ 1., this run has 4"):
        check_distributed_config(cfg, 4)
    with pytest.raises(ConfigError, match="not full fine-tuning"):
        check_distributed_config(cfg.model_copy(update={"adapter": "none"}), 5)
    assert parse_faults("1:scale, 3:nan@5", 4) == {1: ("scale", 1), 3: ("nan", 5)}
    for bad in ("1:melt", "x:nan", "4:nan", "1:nan@x"):
        with pytest.raises(ConfigError, match="MISTRAL_TUNE_FAULTS"):
            parse_faults(bad, 4)


# ---------------------------------------------------------------------- gradients sent during backward


def _overlap_worker(rank: int, root: Path, model_dir: Path) -> None:
    """One of two gloo processes: a 3-layer LoRA model, two micro-batches per rank, summed with and without
    overlap, with per-row recomputed layers or plain ones; the all-reduces and backward passes are recorded
    in the order they happen (wrappers that call the real functions)."""
    import torch.distributed as dist

    from mistral_tune.data.pack import Sample, collate
    from mistral_tune.models.load import load_model
    from mistral_tune.models.lora import LoraSpec, apply_lora
    from mistral_tune.train.loop import accumulate_gradients
    from mistral_tune.train.runtime import Runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=rank, world_size=2)
    events: list[tuple[str, int]] = []
    all_reduce, backward = dist.all_reduce, torch.Tensor.backward

    def recording_all_reduce(tensor, *args, **kwargs):
        events.append(("all_reduce", tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    def recording_backward(self, *args, **kwargs):
        events.append(("backward", 0))
        backward(self, *args, **kwargs)
        events.append(("backward returned", 0))

    dist.all_reduce, torch.Tensor.backward = recording_all_reduce, recording_backward
    model, _ = load_model(str(model_dir))
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(5, 24, (8,), generator=gen)]
    samples = [Sample(torch.randint(3, 1000, (n,), generator=gen).tolist(),
                      torch.randint(3, 1000, (n,), generator=gen).tolist()) for n in lengths]
    batches = [collate(samples, [[2 * i], [2 * i + 1]]) for i in range(4)]  # rank r takes micro-batches 2r, 2r+1
    report = {}
    for recompute in (False, True):
        # per row: a layer's hooks fire per row
        model.configure(gradient_checkpointing=recompute, recompute_by_row=recompute)
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, batches, Runtime(torch.device("cpu"), None))  # one process, the 4 micro-batches
        reference = {n: p.grad.clone() for n, p in named.items()}
        sums = {}
        for overlap in (True, False):
            rt = Runtime(torch.device("cpu"), None, rank, 2, overlap=overlap)
            rt.track_gradients(named, bucket_bytes=1)  # one bucket per layer (and one for the rest, if any)
            model.zero_grad(set_to_none=True)
            events.clear()
            window = accumulate_gradients(model, batches[2 * rank:2 * rank + 2], rt)
            rt.sync_step(1, window.loss_sum, window.n_real, False, False)
            norms = rt.buckets.wait(keep=True)
            assert len(norms) == 2 and all(x > 0 for x in norms)
            for n, p in named.items():
                torch.testing.assert_close(p.grad, reference[n], rtol=1e-5, atol=1e-7)
            sums[overlap] = [p.grad.clone() for p in named.values()]
            last = len(events) - 1 - events[::-1].index(("backward", 0))
            end = events.index(("backward returned", 0), last)
            during = [e for e in events[last:end] if e[0] == "all_reduce"]
            before = [e for e in events[:last] if e[0] == "all_reduce"]
            report[f"recompute={recompute} overlap={overlap}"] = dict(
                buckets=len(rt.buckets.buckets), during_last_backward=len(during), before=len(before),
                after=len([e for e in events[end:] if e[0] == "all_reduce"]))
        assert all(a.equal(b) for a, b in zip(sums[True], sums[False], strict=True))  # the same buckets: bit for bit
    (root / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_each_bucket_is_sent_during_the_last_backward_and_the_sums_equal_one_process(tmp_path):
    """Two gloo processes, gradient accumulation 2: with overlap_gradient_sync every bucket but the last
    (which carries the gradient norms) is all-reduced while the last backward pass runs, none during the
    first; without it, none during any backward. Either way, plain or with layers recomputed one row at
    a time (a layer's hooks fire once per row), the summed gradients equal one process's over all rows,
    and the two ways give the same sums bit for bit."""
    model_dir = create_tiny_model(tmp_path / "model", "v3", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3)
    torch.multiprocessing.spawn(_overlap_worker, args=(tmp_path, model_dir), nprocs=2)
    report = json.loads((tmp_path / "rank0.json").read_text())
    print(report)
    for recompute in (False, True):
        on, off = report[f"recompute={recompute} overlap=True"], report[f"recompute={recompute} overlap=False"]
        assert on["buckets"] == off["buckets"] == 3
        assert on["before"] == off["before"] == 1  # the token count, before the first micro-batch
        assert on["during_last_backward"] == 2 and on["after"] == 1 + 1  # the last bucket, then sync_step's
        assert off["during_last_backward"] == 0 and off["after"] == 3 + 1


# ---------------------------------------------------------------------- evaluations during training


def test_evaluations_during_training_on_two_processes_equal_one_process(assets, tmp_path):
    """An eval: section (tasks, forgetting, needle, early stopping on forgetting.kl) on 2 gloo processes: rank 0
    evaluates while rank 1 waits; the evaluations, the early stop, best/ and the report are the one-process
    run's (figures within 1e-5 relative: the weights agree to float rounding)."""
    from test_eval_run import _eval_section

    model, data = assets
    settings_ = dict(max_steps=12, eval_steps=2, save_steps=None, learning_rate=3e-2, eval=_eval_section(data))
    two = write_yaml(tmp_path / "two.yaml", base_config(model, data, tmp_path / "two", gradient_accumulation_steps=1,
                                                        **settings_))
    launch = train_cli(2, two)
    one = train(config_from_dict(base_config(model, data, tmp_path / "one", gradient_accumulation_steps=2,
                                             **settings_)), echo=lambda *_: None)
    stdout, _ = finish(launch)
    assert one.steps == 4 and "early stopping at step 4: forgetting.kl has not improved" in stdout

    assert_same_evaluations(tmp_path / "two", tmp_path / "one", "forgetting.kl")
    for out in ("one", "two"):
        assert json.loads((tmp_path / out / "best" / "best.json").read_text())["step"] == 2
        assert (tmp_path / out / "eval" / "report.html").is_file()


def test_evaluations_during_sharded_training_run_on_every_process_and_equal_one_process(assets, tmp_path):
    """FSDP full fine-tuning on 2 gloo processes, the layers kept gathered, with an eval: section (tasks,
    forgetting, needle, early stopping on forgetting.ppl): every process runs each evaluation's forward
    passes in lockstep (one rank's forward alone would leave it waiting until distributed_timeout), and
    the figures, the early stop, best/ (its weights) and the report are the one-process run's (figures
    within 1e-5 relative, weights within 1e-5)."""
    from test_eval_run import _eval_section

    model, data = assets
    settings_ = dict(adapter="none", max_steps=12, eval_steps=2, save_steps=None, learning_rate=1e-3,
                     distributed_timeout=60, eval={**_eval_section(data), "metric": "forgetting.ppl"})
    two = write_yaml(tmp_path / "two.yaml", base_config(model, data, tmp_path / "two", gradient_accumulation_steps=1,
                                                        fsdp_reshard_after_forward=False, **settings_))
    launch = train_cli(2, two)
    one = train(config_from_dict(base_config(model, data, tmp_path / "one", gradient_accumulation_steps=2,
                                             **settings_)), echo=lambda *_: None)
    stdout, _ = finish(launch, timeout=240)
    assert ("fsdp: decoder layers kept gathered from their forward to their backward (fsdp_reshard_after_forward: "
            "false; the whole model gathered is 16 MiB)") in stdout
    assert one.steps == 4 and "early stopping at step 4: forgetting.ppl has not improved" in stdout

    got = assert_same_evaluations(tmp_path / "two", tmp_path / "one", "forgetting.ppl")
    assert all({"tasks.token_f1", "needle.accuracy", "loss.nll"} <= r.keys() for r in got)
    for out in ("one", "two"):
        assert json.loads((tmp_path / out / "best" / "best.json").read_text())["step"] == 2
        assert (tmp_path / out / "eval" / "report.html").is_file()
    mine, theirs = (tensors(tmp_path / d / "best" / "model.safetensors") for d in ("two", "one"))
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-5)


def _sharded_worker(rank: int, root: Path, model_dir: Path) -> None:
    """One of two gloo processes on an FSDP2-sharded tiny model: the layers' reshard setting as each value of
    fsdp_reshard_after_forward leaves it, two training steps with each, and greedy generation where this
    rank's rows finish at once (its eos is the first token) while the other rank's do not."""
    from datetime import timedelta

    import torch.distributed as dist

    from mistral_tune.data.pack import Sample, collate
    from mistral_tune.generate.run import generate_batch
    from mistral_tune.models.load import load_model
    from mistral_tune.train.loop import accumulate_gradients
    from mistral_tune.train.runtime import Runtime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))  # a collective one rank skips fails, never hangs
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(*[torch.randint(3, 1000, (20,), generator=gen).tolist()] * 2) for _ in range(8)]
    report: dict = {}
    steps = {}
    for setting in ("auto", True, False):
        rt = Runtime(torch.device("cpu"), None, rank, 2, strategy="fsdp", reshard_after_forward=setting)
        model, _ = load_model(str(model_dir), shard=rt.shard)
        model.train()
        report[str(setting)] = {"sharding": rt.sharding, "layers": [
            group._reshard_after_forward for layer in model.model.layers
            for group in layer._get_fsdp_state()._fsdp_param_groups]}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, grads = [], []
        for step in range(2):
            batch = collate(samples, [[4 * step + 2 * rank], [4 * step + 2 * rank + 1]])
            losses.append(accumulate_gradients(model, [batch], rt).loss_sum)
            grads.append([p.grad.to_local().clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[setting] = (losses, grads)
    for setting in (True, False):  # the same maths either way, bit for bit
        assert steps[setting][0] == steps["auto"][0]
        assert all(a.equal(b) for step_a, step_b in zip(steps[setting][1], steps["auto"][1], strict=True)
                   for a, b in zip(step_a, step_b, strict=True))
    model, _ = load_model(str(model_dir), shard=rt.shard)  # untrained, the layers kept gathered (the last rt)
    model.eval()
    prompts = [samples[0].tokens[:7], samples[1].tokens[:5]]
    first = generate_batch(model, prompts, 1)[0][0]
    # rank 0: one row, which ends at once (its first token is eos); rank 1: two rows that go on
    prompts, eos = (prompts[:1], first) if rank == 0 else (prompts, None)
    report["generated"] = generate_batch(model, prompts, 5, eos_id=eos, every=rt.every)
    report["eos"] = eos
    report["gathered"] = sum(type(p).__name__ != "DTensor" for p in model.parameters())
    rt.release_gathered(model)  # the shards again, the gathered weights freed
    report["gathered_after_release"] = sum(type(p).__name__ != "DTensor" for p in model.parameters())
    (root / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_the_reshard_setting_reaches_every_layer_gives_the_same_steps_and_generation_ends_together(tmp_path):
    """fsdp_reshard_after_forward true / false / auto (CPU: true) sets each sharded decoder layer's FSDP
    reshard-after-forward, and two training steps give the same losses and gradients bit for bit either way.
    Generating on the sharded model, a rank whose rows have all ended keeps taking part in the forward
    passes until the other's have: its answer stops at eos, the other's are the one-process model's."""
    from mistral_tune.generate.run import generate_batch
    from mistral_tune.models.load import load_model

    model_dir = create_tiny_model(tmp_path / "model", "v3", hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3)
    torch.multiprocessing.spawn(_sharded_worker, args=(tmp_path, model_dir), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        for setting, layers in (("True", [True] * 3), ("False", [False] * 3), ("auto", [True] * 3)):
            assert report[setting]["layers"] == layers, setting
        assert "kept gathered" in report["False"]["sharding"] and "resharded" in report["True"]["sharding"]
        assert "CPU processes share the host's memory" in report["auto"]["sharding"]
        assert report["gathered"] > 0 and report["gathered_after_release"] == 0
    whole, _ = load_model(str(model_dir))
    samples_gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(3, 1000, (20,), generator=samples_gen).tolist() for _ in range(8)]
    expected = generate_batch(whole.eval(), [tokens[0][:7], tokens[1][:5]], 5)
    rank0, rank1 = ranks
    assert rank1["generated"] == expected and len(expected[0]) == len(expected[1]) == 5
    assert rank0["generated"] == [[]] and rank0["eos"] == expected[0][0]


def test_auto_keeps_the_layers_gathered_when_the_whole_model_takes_a_quarter_of_the_gpu_at_most():
    h200 = 139 * 2**30  # an H200's memory as CUDA reports it, about
    keep, why = resolve_reshard("auto", 7_248_000_000 * 2, h200)  # Mistral 7B in bf16: 10%
    assert not keep and "kept gathered" in why and "13.5 GiB" in why and "10% of the GPU's 139 GiB" in why
    keep, why = resolve_reshard("auto", 70_000_000_000 * 2, h200)  # a 70B model: 97%
    assert keep and "more than 25%" in why
    assert resolve_reshard("auto", h200 // 4, h200)[0] is False and resolve_reshard("auto", h200 // 4 + 1, h200)[0]
    assert resolve_reshard("auto", 1, None)[0]  # CPU processes: always resharded
    assert resolve_reshard(False, 10**12, h200)[0] is False and resolve_reshard(True, 1, h200)[0] is True
