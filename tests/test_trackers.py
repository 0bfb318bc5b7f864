"""Experiment trackers (report_to): what a run sends to W&B and MLflow, read back through each library's own
reader (wandb's `leet inspect` of the offline run files, MLflow's MlflowClient), in the stores users have."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _runs import config, make_assets, write_yaml
from mistral_tune.cli import main
from mistral_tune.config import config_from_dict
from mistral_tune.errors import ConfigError
from mistral_tune.train.loop import train
from mistral_tune.train.trackers import FAILED, FINISHED, STATE, STOPPED, Trackers, check_trackers, tracker_name

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

WANDB_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")  # W&B's names that sort and filter (its metric naming rule)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("trackers"), n_records=24)


def _offline(monkeypatch) -> None:
    """W&B offline, and no tracker setting from the environment."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT",
                "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    _offline(monkeypatch)
    saved = signal.getsignal(signal.SIGTERM)  # a stop by SIGTERM leaves it ignored in this process
    yield
    signal.signal(signal.SIGTERM, saved)


def _run(assets, out: Path, echo=lambda *a: None, **overrides):
    model, data = assets
    cfg = dict(report_to=["wandb", "mlflow"], max_steps=6, save_steps=3, val_set_size=8, lr_scheduler="constant")
    cfg.update(overrides)
    return train(config(model, data, out, **cfg), echo=echo, force=True)


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the tests that do not test the default one (creating a store's tables
    takes seconds); each run in it has its own id."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    # The experiment the runs go to, with its artifacts here (MLflow's default is ./mlruns of the working directory)
    MlflowClient(uri).create_experiment("mistral-tune", artifact_location=(folder / "artifacts").as_uri())
    return uri


def _mlflow(out: Path, uri: str | None = None):
    """MLflow's client on the run's store (by default output_dir/mlflow.db), and the run's id."""
    from mlflow import MlflowClient

    return (MlflowClient(uri or f"sqlite:///{out.resolve() / 'mlflow.db'}"),
            json.loads((out / STATE).read_text())["mlflow"]["run_id"])


def _mlflow_history(client, run_id: str, lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each name of metrics.jsonl, as MLflow has it under tracker_name's name."""
    names = {k for rec in lines for k in _numbers(rec)}
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, tracker_name(n))) for n in names}


def _wandb_records(out: Path) -> list[dict]:
    """Every record of the run's .wandb files, as W&B's own reader (`wandb leet inspect --json`) gives them."""
    records = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, check=True, timeout=120).stdout
        records += [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return records


def _by_step(lines: list[dict]) -> dict[int, dict]:
    """metrics.jsonl's numbers merged by step (W&B keeps one history row a step), under tracker_name's names."""
    rows: dict[int, dict] = {}
    for rec in lines:
        rows.setdefault(rec["step"], {}).update({tracker_name(k): v for k, v in _numbers(rec).items()})
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


def _exit_codes(records: list[dict]) -> list[int]:
    return [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"]


# ---------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def evaluated_run(assets, tmp_path_factory):
    """A run as the README shows it (a relative output_dir, MLflow's default store) with a held-out set and an
    eval: section that keeps best/: every line must reach both trackers."""
    model, data = assets
    root = tmp_path_factory.mktemp("evaluated")
    section = {"metric": "tasks.exact_match", "tasks": {"dataset": {"path": str(data)}, "max_samples": 2,
                                                         "max_new_tokens": 2}}
    echoed: list[str] = []
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: before the function-scoped `offline`
        _offline(mp)
        mp.chdir(root)
        _run(assets, Path("runs/first"), echo=echoed.append, eval=section, eval_steps=3, wandb_project="tune-tests",
             wandb_group="g1", wandb_tags=["tiny", "cpu"], mlflow_experiment_name="tiny-experiment")
    assert not [line for line in echoed if line.startswith("report_to")]
    return root / "runs" / "first"


@pytest.mark.slow
def test_evaluations_base_and_tuned_reach_wandb_and_mlflow_with_a_held_out_set(evaluated_run):
    """Every metrics.jsonl line, the held-out loss and the eval: section's NAME / NAME@base at the same steps
    included, reaches both trackers; the adapter, best/ and the evaluation report are artifacts. The run is
    the README's set-up: a relative output_dir and MLflow's default store in it."""
    out = evaluated_run
    lines = _lines(out)
    assert {"tasks.exact_match", "tasks.exact_match@base", "eval_loss"} <= {k for rec in lines for k in rec}
    assert sum("loss" in rec for rec in lines) == 6

    client, run_id = _mlflow(out)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-experiment"
    params = run.data.params
    assert params["lora_r"] == "4" and params["datasets_0_format"] == "messages"
    assert params["run_total_steps"] == "6" and params["data_train_samples"] == str(
        json.loads((out / "data_report.json").read_text())["train_samples"])
    history = _mlflow_history(client, run_id, lines)
    assert history["tasks.exact_match@base"] and history["eval_loss"]
    for name, points in history.items():  # each metric: the steps and values of metrics.jsonl, once each
        _same_points(points, [(rec["step"], rec[name]) for rec in lines if name in _numbers(rec)], name)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "data_report.json", "adapter", "best", "eval", "report.html"} <= top
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run_id, "adapter")}
    assert "best/best.json" in {a.path for a in client.list_artifacts(run_id, "best")}

    records = _wandb_records(out)
    (start,) = [r["run"] for r in records if r["type"] == "run"]
    assert start["run_id"] == json.loads((out / STATE).read_text())["wandb"]["run_id"]
    assert (start["project"], start["run_group"], start["tags"]) == ("tune-tests", "g1", ["tiny", "cpu"])
    config_items = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config_items["lora_r"] == 4 and config_items["run_total_steps"] == 6
    rows = {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in records if r["type"] == "history"}
    _same_rows(rows, _by_step(lines))
    assert all(WANDB_NAME.fullmatch(k) for row in rows.values() for k in row)
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {"config.yaml", "data_report.json"} <= saved
    assert sum(r["type"] == "artifact" and r["artifact"]["type"] == "model" for r in records) == 2  # adapter, best
    assert _exit_codes(records) == [0]


def test_a_stopped_run_ends_its_tracker_run_as_killed_and_a_resumed_one_finishes_it(assets, tmp_path, store):
    """SIGTERM during a run: the MLflow run is KILLED (resumable), not left RUNNING; resume=auto finishes it."""
    out = tmp_path / "run"

    def stop_at_step_1(line: str) -> None:
        if line.startswith("step 1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    result = _run(assets, out, echo=stop_at_step_1, report_to=["mlflow"], val_set_size=0, mlflow_tracking_uri=store)
    assert result.stopped_by == "SIGTERM" and result.steps < 6
    client, run_id = _mlflow(out, store)
    assert client.get_run(run_id).info.status == "KILLED"
    _run(assets, out, report_to=["mlflow"], val_set_size=0, max_steps=result.steps + 1, resume="auto",
         mlflow_tracking_uri=store)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, result.steps + 2))


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs_without_repeating_steps(assets, tmp_path, store):
    out = tmp_path / "run"
    _run(assets, out, mlflow_tracking_uri=store)  # steps 1-6 reach the trackers, then back to checkpoint-3
    ids = json.loads((out / STATE).read_text())
    _run(assets, out, max_steps=8, resume=str(out / "checkpoint-3"), mlflow_tracking_uri=store)
    assert json.loads((out / STATE).read_text())["mlflow"]["run_id"] == ids["mlflow"]["run_id"]
    lines = _lines(out)
    assert [rec["step"] for rec in lines if "loss" in rec] == list(range(1, 9))

    client, run_id = _mlflow(out, store)
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


# ---------------------------------------------------------------------- the trackers alone, on MLflow's stores


def _cfg(out, **keys):
    return config_from_dict({"datasets": [{"path": "x.jsonl"}], "output_dir": str(out), **keys})


def _open(out: Path, echoed: list[str] | None = None, **keys) -> Trackers:
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg = _cfg(out, **{"report_to": ["mlflow"], **keys})
    return Trackers.open(cfg, Path(out), None, {"lora_r": 4, "datasets.0.path": "x.jsonl"},
                         {"config.yaml": "lora_r: 4\n"}, echo=(echoed if echoed is not None else []).append)


def _evaluation_lines(trackers: Trackers) -> None:
    """A run without a held-out set: step lines, then the evaluation with the base model's values."""
    trackers.log("train", 1, {"step": 1, "loss": 2.5, "lr": 1e-3})
    trackers.log("eval", 2, {"tasks.exact_match": 0.5, "tasks.exact_match@base": 0.0, "loss.nll@base": 3.25})
    trackers.log("train", 2, {"step": 2, "loss": 2.0, "lr": 1e-3})


def _read_back(client, run_id: str) -> dict:
    names = ("loss", "tasks_exact_match", "tasks_exact_match_base", "loss_nll_base")
    run = client.get_run(run_id)
    return {"status": run.info.status, "params": run.data.params,
            "metrics": {n: [(m.step, m.value) for m in client.get_metric_history(run_id, n)] for n in names},
            "artifacts": {a.path for a in client.list_artifacts(run_id)}}


def _adapter(tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}\n")
    return adapter


def test_mlflow_in_a_relative_sqlite_store_gets_every_name_the_artifact_and_finishes(tmp_path, monkeypatch, store):
    """A relative sqlite:/// URI and a relative output_dir: names with '@' and '.' arrive (tracker_name), the
    lines after them and the artifact too, and the run is FINISHED."""
    from mlflow import MlflowClient

    folder = Path(store.removeprefix("sqlite:///")).parent
    monkeypatch.chdir(folder)
    echoed: list[str] = []
    trackers = _open(Path("runs") / tmp_path.name, echoed, mlflow_tracking_uri="sqlite:///mlflow.db")
    _evaluation_lines(trackers)
    trackers.close([_adapter(tmp_path)], FINISHED)
    assert echoed == []
    got = _read_back(MlflowClient(store), json.loads((folder / "runs" / tmp_path.name / STATE).read_text())[
        "mlflow"]["run_id"])
    assert got["status"] == "FINISHED"
    assert got["params"] == {"lora_r": "4", "datasets_0_path": "x.jsonl"}
    assert got["metrics"] == {"loss": [(1, 2.5), (2, 2.0)], "tasks_exact_match": [(2, 0.5)],
                              "tasks_exact_match_base": [(2, 0.0)], "loss_nll_base": [(2, 3.25)]}
    assert got["artifacts"] == {"adapter", "config.yaml"}


def test_a_file_store_is_refused_before_the_run_with_the_fix_or_kept_when_allowed(tmp_path, monkeypatch, capsys):
    """MLflow 3 refuses file:./mlruns: validate says so in one line, before the model loads (the base_model
    here does not exist); with MLflow's own MLFLOW_ALLOW_FILE_STORE=true the store is used as named."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    cfg = {"base_model": str(tmp_path / "no-model"), "datasets": [{"path": "x.jsonl"}], "report_to": ["mlflow"],
           "mlflow_tracking_uri": "file:./mlruns"}
    assert main(["validate", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and "mlflow_tracking_uri: file:./mlruns is an MLflow file store" in printed[0]
    with pytest.raises(ConfigError, match=r"^mlflow_tracking_uri: file:./mlruns is an MLflow file store.*"
                                          r"sqlite:///mlruns\.db.*MLFLOW_ALLOW_FILE_STORE=true"):
        check_trackers(_cfg("out", report_to=["mlflow"], mlflow_tracking_uri="file:./mlruns"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")  # the environment variable, named as such
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI \(environment\): ./mlruns is an MLflow file"):
        check_trackers(_cfg("out", report_to=["mlflow"]))
    assert not (tmp_path / "mlruns").exists()

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_trackers(_cfg("out", report_to=["mlflow"])) == ["mlflow: experiment mistral-tune in ./mlruns"]
    trackers = _open("out")
    _evaluation_lines(trackers)
    trackers.close([], FINISHED)
    run_id = json.loads((tmp_path / "out" / STATE).read_text())["mlflow"]["run_id"]
    got = _read_back(MlflowClient("file:./mlruns"), run_id)
    assert got["status"] == "FINISHED" and got["metrics"]["tasks_exact_match_base"] == [(2, 0.0)]


def test_tracker_settings_are_checked_by_the_libraries_rules_with_the_key_named(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"mlflow_tracking_uri: sqlite:///missing/m.db: the folder missing does"):
        check_trackers(_cfg(tmp_path, report_to=["mlflow"], mlflow_tracking_uri="sqlite:///missing/m.db"))
    with pytest.raises(ConfigError, match=r"^wandb_project: 'a/b': W&B refuses it \(Invalid project name"):
        check_trackers(_cfg(tmp_path, report_to=["wandb"], wandb_project="a/b"))
    with pytest.raises(ConfigError, match=r"^wandb_tags: \[.*\]: W&B refuses it \(.*between 1 and 64 characters"):
        check_trackers(_cfg(tmp_path, report_to=["wandb"], wandb_tags=["x" * 65]))
    lines = check_trackers(_cfg(tmp_path, report_to=["tensorboard", "wandb", "mlflow"], wandb_project="p",
                                mlflow_tracking_uri=f"sqlite:///{tmp_path}/m.db", mlflow_experiment_name="e"))
    assert lines == ["wandb: project p, kept in output_dir/wandb (WANDB_MODE=offline)",
                     f"mlflow: experiment e in sqlite:///{tmp_path}/m.db"]
    assert not (tmp_path / "m.db").exists()  # checked, not created


def test_run_status_finished_stopped_failed_as_each_library_records_it(tmp_path, store):
    """MLflow: FINISHED, KILLED, FAILED; W&B's resumable stop: preempting, exit code 128 + the signal's number."""
    for status, mlflow_status in ((FINISHED, "FINISHED"), (STOPPED, "KILLED"), (FAILED, "FAILED")):
        out = tmp_path / status
        trackers = _open(out, report_to=["mlflow", "wandb"] if status == STOPPED else ["mlflow"],
                         mlflow_tracking_uri=store)
        trackers.log("train", 1, {"step": 1, "loss": 1.0})
        trackers.close([], status, "SIGINT" if status == STOPPED else None)
        trackers.close([], FINISHED)  # a second close (the loop's safety net) changes nothing
        client, run_id = _mlflow(out, store)
        assert client.get_run(run_id).info.status == mlflow_status
    records = _wandb_records(tmp_path / STOPPED)
    assert any(r["type"] == "preempting" for r in records) and _exit_codes(records) == [130]


def test_a_tracker_that_fails_is_reported_once_closed_as_failed_and_the_others_go_on(tmp_path, store):
    """MLflow's run deleted under the tracker (its calls now raise): one line, no exception into the run,
    later lines still reach W&B, and W&B's run finishes."""
    echoed: list[str] = []
    trackers = _open(tmp_path, echoed, report_to=["wandb", "mlflow"], mlflow_tracking_uri=store)
    client, run_id = _mlflow(tmp_path, store)
    client.delete_run(run_id)
    _evaluation_lines(trackers)
    trackers.close([_adapter(tmp_path)], FINISHED)
    assert len(echoed) == 1 and re.fullmatch(r"report_to: mlflow failed \(MlflowException: .+\); the run goes on "
                                             r"without it", echoed[0]), echoed
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"
    records = _wandb_records(tmp_path)
    steps = [r["history"]["step"]["num"] for r in records if r["type"] == "history"]
    assert steps == [1, 2] and _exit_codes(records) == [0]


@given(st.text(max_size=300))
def test_tracker_names_are_accepted_by_wandb_and_mlflow(name):
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    got = tracker_name(name)
    assert WANDB_NAME.fullmatch(got) and len(got) <= 250
    _validate_metric_name(got)  # MLflow's own checks raise on a name it refuses
    _validate_param_name(got)
    assert tracker_name(got) == got  # a name already accepted stays as it is


def test_tracker_names_keep_the_configs_keys_apart():
    cfg = config_from_dict({"datasets": [{"path": "x.jsonl"}], "eval": {"tasks": {"dataset": {"path": "e.jsonl"}},
                                                                        "forgetting": {"dataset": {"path": "g.jsonl"}},
                                                                        "needle": {}}})
    from mistral_tune.train.trackers import flatten

    keys = list(flatten(cfg.model_dump(mode="json")))
    assert len({tracker_name(k) for k in keys}) == len(keys)
    assert tracker_name("tasks.exact_match@base") == "tasks_exact_match_base"


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
