"""Experiment trackers (report_to): what a run sends to W&B and MLflow, read back through each library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _runs import config, make_assets
from mistral_tune.config import config_from_dict
from mistral_tune.errors import ConfigError
from mistral_tune.train.loop import train
from mistral_tune.train.trackers import STATE

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("trackers"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)


def _run(assets, out: Path, **overrides):
    model, data = assets
    cfg = dict(report_to=["wandb", "mlflow"], max_steps=6, save_steps=3, val_set_size=8, lr_scheduler="constant")
    cfg.update(overrides)
    return train(config(model, data, out, **cfg), echo=lambda *a: None, force=True)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _mlflow(out: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out / 'mlflow.db'}"), json.loads((out / STATE).read_text())["mlflow"]["run_id"]


def _mlflow_history(client, run_id: str, lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    names = {k for rec in lines for k in _numbers(rec)}
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


def _wandb_records(out: Path) -> list[dict]:
    """Every record of the run's .wandb files, as W&B's own reader (`wandb leet inspect --json`) gives them."""
    records = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, check=True, timeout=120).stdout
        records += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return records


def _by_step(lines: list[dict]) -> dict[int, dict]:
    """metrics.jsonl's numbers merged by step, as W&B keeps one history row a step."""
    rows: dict[int, dict] = {}
    for rec in lines:
        rows.setdefault(rec["step"], {}).update(_numbers(rec))
    return rows


def _approx(rows):
    return pytest.approx(rows, rel=1e-6)


def _same_points(got: list[tuple[int, float]], want: list[tuple[int, float]], name: str) -> None:
    """(step, value) histories: the same steps, values within rel 1e-6 (pytest.approx takes no tuples)."""
    assert [s for s, _ in got] == [s for s, _ in want], name
    assert [v for _, v in got] == _approx([v for _, v in want]), name


def _same_rows(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert list(got) == list(want)
    for step, row in want.items():
        assert got[step] == _approx(row), step


@pytest.mark.slow
def test_wandb_and_mlflow_get_params_every_metrics_line_and_the_adapter(assets, tmp_path):
    out = tmp_path / "run"
    _run(assets, out)
    lines = _lines(out)
    assert any("eval_loss" in rec for rec in lines) and sum("loss" in rec for rec in lines) == 6

    client, run_id = _mlflow(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["lora_r"] == "4" and params["datasets.0.format"] == "messages"
    assert params["run.total_steps"] == "6" and params["data.train_samples"] == str(
        json.loads((out / "data_report.json").read_text())["train_samples"])
    history = _mlflow_history(client, run_id, lines)
    for name, points in history.items():  # each metric: the steps and values of metrics.jsonl, once each
        _same_points(points, [(rec["step"], rec[name]) for rec in lines if name in _numbers(rec)], name)
    artifacts = {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts
    assert {"config.yaml", "data_report.json"} <= {a.path for a in client.list_artifacts(run_id)}

    records = _wandb_records(out)
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {
        json.loads((out / STATE).read_text())["wandb"]["run_id"]}
    config_items = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config_items["lora_r"] == 4 and config_items["run.total_steps"] == 6
    rows = {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in records if r["type"] == "history"}
    _same_rows(rows, _by_step(lines))
    assert any(r["type"] == "artifact" and r["artifact"]["type"] == "model" for r in records)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs_without_repeating_steps(assets, tmp_path):
    out = tmp_path / "run"
    _run(assets, out)  # steps 1-6 reach the trackers, then the run goes back to its checkpoint at step 3
    ids = json.loads((out / STATE).read_text())
    _run(assets, out, max_steps=8, resume=str(out / "checkpoint-3"))
    assert json.loads((out / STATE).read_text())["mlflow"]["run_id"] == ids["mlflow"]["run_id"]
    lines = _lines(out)
    assert [rec["step"] for rec in lines if "loss" in rec] == list(range(1, 9))

    client, run_id = _mlflow(out)
    assert run_id == ids["mlflow"]["run_id"] and len(client.search_runs([client.get_run(run_id).info.experiment_id]))
    for name in ("loss", "lr", "grad_norm", "eval_loss"):  # steps 4-6 once, though trained twice
        points = _mlflow_history(client, run_id, lines)[name]
        _same_points(points, [(rec["step"], rec[name]) for rec in lines if name in rec], name)

    records = _wandb_records(out)
    assert {r["run"]["run_id"] for r in records if r["type"] == "run"} == {ids["wandb"]["run_id"]}
    steps = [r["history"]["step"]["num"] for r in records if r["type"] == "history"]
    assert steps == list(range(1, 9))
    rows = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    for step, rec in _by_step(lines).items():
        assert {k: rows[step][k] for k in ("loss", "lr", "grad_norm")} == _approx(
            {k: rec[k] for k in ("loss", "lr", "grad_norm")})


@pytest.mark.parametrize("package", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_a_clear_error_before_anything_is_written(assets, tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import PACKAGE` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"report_to: {package} needs .*mistral-tune\[{package}\]"):
        _run(assets, out, report_to=[package])
    assert not out.exists()


def test_report_to_names_the_key_and_the_choices():
    base = {"datasets": [{"path": "x.jsonl"}]}
    assert config_from_dict(base).report_to == ["tensorboard"]
    assert config_from_dict({**base, "report_to": []}).report_to == []
    with pytest.raises(ConfigError, match=r"report_to.*'neptune'.*'tensorboard', 'wandb' or 'mlflow'"):
        config_from_dict({**base, "report_to": ["wandb", "neptune"]})
    with pytest.raises(ConfigError, match="report_to.*twice"):
        config_from_dict({**base, "report_to": ["mlflow", "mlflow"]})
