"""Several processes (torchrun, gloo on CPU): the same maths as one process, every row once per epoch,
ranks that agree, robust aggregation against faulty workers, and a killed worker restarted exactly.

Each torchrun launch costs a few seconds of Python start-up per process on a small machine, so runs
that need no signal share a launch (tests/dist_worker.py) and independent launches run side by side."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _runs import SRC, base_config, make_assets, metrics, tensors, write_yaml
from mistral_tune.config import config_from_dict
from mistral_tune.errors import ConfigError
from mistral_tune.train.checkpoint import CheckpointManager
from mistral_tune.train.loop import RowStream, train
from mistral_tune.train.runtime import aggregate, check_distributed_config, parse_faults

TESTS = Path(__file__).resolve().parent


def torchrun(n: int, *args: str, restarts: int = 0, env: dict | None = None) -> subprocess.Popen:
    """n gloo processes on this machine through PyTorch's launcher, on these sources, one thread each."""
    full_env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           f"--max-restarts={restarts}", "--monitor-interval=0.2", *args]
    return subprocess.Popen(cmd, env=full_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def train_cli(n: int, config: Path, *overrides: str, restarts: int = 0) -> subprocess.Popen:
    return torchrun(n, "-m", "mistral_tune", "train", str(config), *overrides, restarts=restarts)


def finish(proc: subprocess.Popen, expect_rc: int = 0, timeout: float = 300) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
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


def test_one_two_and_four_processes_give_the_same_steps(assets, tmp_path):
    """The same global batch (micro-batch 3 x accumulation x processes = 12 rows; epochs end mid-step, with a
    one-row micro-batch) on 1, 2 and 4 gloo processes: per-step losses within 1e-6 relative, held-out
    losses too, checkpoints at the same steps (every 3, and at each epoch's end), final adapters within 1e-5."""
    model, data = assets
    settings_ = dict(max_steps=6, micro_batch_size=3, save_steps=3, eval_steps=2, val_set_size=4, warmup_steps=2)
    launches = {}
    for world in (2, 4):
        cfg = base_config(model, data, tmp_path / f"w{world}", gradient_accumulation_steps=4 // world, **settings_)
        launches[world] = train_cli(world, write_yaml(tmp_path / f"w{world}.yaml", cfg))
    one = config_from_dict(base_config(model, data, tmp_path / "w1", gradient_accumulation_steps=4, **settings_))
    train(one, echo=lambda *_: None)
    for proc in launches.values():
        stdout, _ = finish(proc)
        assert stdout.count("trained 6 steps") == 1  # rank 0 alone reports
    reference = metrics(tmp_path / "w1")
    assert [r["step"] for r in reference if "loss" in r] == list(range(1, 7))
    worst = 0.0
    for world in (2, 4):
        out = tmp_path / f"w{world}"
        got = metrics(out)
        assert len(got) == len(reference)
        for mine, theirs in zip(got, reference, strict=True):
            assert mine.keys() == theirs.keys()
            for key in ("step", "epoch", "lr", "trained_tokens"):
                assert mine.get(key) == theirs.get(key), (world, mine, theirs)
            for key in ("loss", "eval_loss"):
                if key in mine:
                    rel = abs(mine[key] - theirs[key]) / abs(theirs[key])
                    worst = max(worst, rel)
                    assert rel <= 1e-6, (world, key, mine, theirs)
        assert ([p.name for p in CheckpointManager(out, 9).checkpoints()]
                == [p.name for p in CheckpointManager(tmp_path / "w1", 9).checkpoints()])
        mine, theirs = tensors(out / "adapter" / "adapter_model.safetensors"), tensors(
            tmp_path / "w1" / "adapter" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-5)
    print(f"largest relative loss difference over 1/2/4 processes: {worst:.2e}")


# ---------------------------------------------------------------------- faulty workers

ROBUST_TOLERANCE = 0.01  # relative distance of each step's loss from the clean run's


def test_robust_aggregation_withstands_one_and_two_faulty_processes(assets, tmp_path):
    """Five gloo processes; one or two send gradients x1e4, sign-flipped, NaN or noise. Robust aggregation
    keeps every step's loss within 1% of the clean run's, learns at least 80% of what it learns, and names
    the faulty ranks; mean does not."""
    model, data = assets
    runs = {  # name: (aggregation, byzantine_tolerance, faults)
        "clean": ("mean", 0, ""),
        "mean_noise": ("mean", 0, "1:noise"),
        "mean_nan": ("mean", 0, "1:nan,3:scale"),
        "median_scale": ("median", 1, "1:scale"),
        "trimmed_flip_scale": ("trimmed_mean", 2, "1:signflip,3:scale"),
        "clip_noise_nan": ("centered_clip", 2, "2:noise,4:nan"),
        "median_scale_noise": ("median", 2, "0:scale,3:noise"),
    }
    args = []
    for name, (aggregation, f, faults) in runs.items():
        cfg = base_config(model, data, tmp_path / name, max_steps=8, micro_batch_size=1, save_steps=None,
                          warmup_steps=2, gradient_aggregation=aggregation, byzantine_tolerance=f)
        args.append(f"{write_yaml(tmp_path / f'{name}.yaml', cfg)}@{faults}")
    results_file = tmp_path / "results.json"
    finish(torchrun(5, str(TESTS / "dist_worker.py"), str(results_file), *args))
    results = {Path(k).stem: v for k, v in json.loads(results_file.read_text()).items()}

    losses = {}
    for name, (_, _, faults) in runs.items():
        lines = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in lines if "loss" in r]
        losses[name] = [r["loss"] for r in steps]
        print(f"{name:20} {results[name][:60]:60} " + " ".join(f"{x:.4f}" for x in losses[name]))
        loud = sorted(int(p.split(":")[0]) for p in faults.split(",") if p and not p.endswith("signflip"))
        # Every step names the ranks whose gradient is far out (a sign flip of a small gradient need not be);
        # after three such steps each is reported once by name.
        assert all(set(loud) <= set(r.get("outlier_ranks", [])) for r in steps), (name, steps)
        assert sorted(r["rank"] for r in lines if r.get("event") == "outlier_rank") == (loud if len(steps) >= 3 else [])
    clean = losses.pop("clean")
    learned = lambda curve: (clean[0] - curve[-1]) / (clean[0] - clean[-1])  # noqa: E731
    for name in ("median_scale", "trimmed_flip_scale", "clip_noise_nan", "median_scale_noise"):
        assert results[name] == "ok"
        assert all(abs(a - b) <= ROBUST_TOLERANCE * b for a, b in zip(losses[name], clean, strict=True)), name
        assert learned(losses[name]) > 0.8, name  # it learns what the clean run learns
    # Mean is steered: noise from one rank undoes the learning; a NaN gradient makes every step a bad step
    # until the guard stops the run.
    assert results["mean_noise"] == "ok" and learned(losses["mean_noise"]) < 0.2
    assert results["mean_nan"].startswith("stopped at step 5 after 5 bad steps in a row")


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
    assert parse_faults("1:scale, 3:nan", 4) == {1: "scale", 3: "nan"}
    for bad in ("1:melt", "x:nan", "4:nan"):
        with pytest.raises(ConfigError, match="MISTRAL_TUNE_FAULTS"):
            parse_faults(bad, 4)
