"""Evaluations during training (metrics in the log, best/ kept, early stopping, the report) and
`mistral-tune eval` on the run afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from _runs import base_config, make_assets, write_yaml
from mistral_tune.cli import main
from mistral_tune.config import config_from_dict
from mistral_tune.errors import ConfigError
from mistral_tune.evaluate.run import BestTracker
from mistral_tune.quickstart import data_dir
from mistral_tune.train.loop import train


def _eval_section(data: Path) -> dict:
    return {
        "metric": "forgetting.kl",
        "early_stopping_patience": 1,
        "tasks": {"dataset": {"path": str(data)}, "max_samples": 4, "max_new_tokens": 3},
        "forgetting": {"dataset": {"path": str(data_dir() / "general.jsonl")}, "max_samples": 4, "max_tokens": 32},
        "needle": {"lengths": [32], "depths": [0.5], "trials": 1, "key_digits": 1},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    model, data = make_assets(root, n_records=16)
    cfg = config_from_dict(base_config(model, data, root / "out", max_steps=12, eval_steps=2, save_steps=None,
                                       learning_rate=3e-2, eval=_eval_section(data)))
    lines: list[str] = []
    result = train(cfg, echo=lines.append)
    return root, result, lines


def test_training_logs_evaluations_keeps_the_best_and_stops_early(run):
    root, result, lines = run
    out = root / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "forgetting.kl" in r]
    # KL from the base only grows as the adapter trains, so the first evaluation is the best and
    # the second, not better, ends the run (patience 1).
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[0]["forgetting.kl"] < evals[1]["forgetting.kl"]
    assert {"tasks.exact_match", "tasks.exact_match@base", "needle.accuracy", "loss.nll@base"} <= set(evals[0])
    assert result.steps == 4
    assert any(line.startswith("early stopping at step 4: forgetting.kl has not improved for 1 evaluations")
               for line in lines)
    assert result.best["step"] == 2 and result.best["metric"] == "forgetting.kl"
    best = Path(result.best["dir"])
    assert json.loads((best / "best.json").read_text())["step"] == 2
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    kept = load_file(str(best / "adapter_model.safetensors"))
    assert final.keys() == kept.keys() and any(not final[k].equal(kept[k]) for k in final)  # step 2's weights
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    assert report["step"] == 4 and report["best"]["step"] == 2
    assert [h["step"] for h in report["history"] if "forgetting.kl" in h] == [2, 4]
    assert result.report == out / "eval" / "report.html" and result.report.is_file()


def test_the_run_report_and_the_evaluation_report_link_each_other(run):
    root, result, lines = run
    out = root / "out"
    run_page = (out / "report.html").read_text()
    assert "<a href='eval/report.html'>" in run_page and any(line == f"run report: {out / 'report.html'}"
                                                              for line in lines)
    assert "<a href='../report.html'>" in result.report.read_text()
    assert 'id="series-forgetting.kl"' in run_page
    for name in ("loss.nll", "tasks.exact_match"):  # the base's values beside the tuned model's
        assert f'id="series-{name}"' in run_page and f'id="series-{name}@base"' in run_page


def test_eval_command_on_the_run(run, capsys):
    root, _, _ = run
    out = root / "out"
    (out / "eval" / "report.html").unlink()
    code = main(["eval", str(out), "eval.needle=null", "eval.tasks.max_samples=2"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "tasks.exact_match: base 0 -> tuned" in printed.out
    assert f"report: {out / 'eval' / 'report.html'}" in printed.out
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    assert [ev["name"] for ev in report["evaluations"]] == ["tasks", "loss", "forgetting"]
    assert report["model"]["base"] == "the same model with its adapters off"
    assert len(report["evaluations"][0]["examples"]) == 2


@pytest.mark.parametrize("args, message", [
    (["eval.tasks.metrcs=[bleu]"], "unknown key 'eval.tasks.metrcs'; did you mean 'metrics'?"),
    (["lr=3"], "mistral-tune eval takes eval.* keys only"),
    (["eval.tasks=null", "eval.forgetting=null", "eval.needle=null", "eval.metric=loss"], "nothing to evaluate"),
])
def test_eval_command_errors_are_one_line(run, capsys, args, message):
    root, _, _ = run
    code = main(["eval", str(root / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_bad_eval_section_stops_training_before_anything_is_written(tmp_path):
    model, data = make_assets(tmp_path, n_records=8)
    section = {"tasks": {"dataset": {"path": str(tmp_path / "missing.jsonl")}}}
    cfg = config_from_dict(base_config(model, data, tmp_path / "out", eval=section))
    code = main(["train", str(write_yaml(tmp_path / "c.yaml", cfg.model_dump(mode="json")))])
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_best_tracker_direction_and_patience():
    low = BestTracker("forgetting.kl", patience=2)
    assert [low.update(s, {"forgetting.kl": v}) for s, v in ((1, 0.3), (2, 0.2), (3, 0.25), (4, float("nan")))] == [
        True, True, False, False]
    assert low.should_stop and low.best_step == 2
    high = BestTracker("tasks.exact_match", patience=None)
    assert [high.update(s, {"tasks.exact_match": v}) for s, v in ((1, 0.1), (2, 0.1), (3, 0.4))] == [True, False, True]
    assert not high.should_stop
    with pytest.raises(ConfigError, match="eval.metric: tasks.f1 was not measured; measured: tasks.exact_match$"):
        BestTracker("tasks.f1", patience=None).update(4, {"tasks.exact_match": 0.5, "tasks.exact_match@base": 0.0})


def test_drift_of_served_prompts_from_the_training_data(run, capsys):
    from mistral_tune.serve.request_log import RequestLog
    from mistral_tune.serve.server import ChatRequest

    root, _, _ = run
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    alike, unlike = RequestLog(root / "alike"), RequestLog(root / "unlike")
    for rec in records:
        alike.record(ChatRequest.model_validate({"messages": rec["messages"][:-1]}), 0)
        text = "Translate into German, keeping the tone of a legal contract: " + " ".join(["the party of the "
                                                                                            "first part"] * 20)
        unlike.record(ChatRequest.model_validate({"messages": [{"role": "user", "content": text}]}), 0)
    assert main(["eval", str(root / "out"), "--drift", str(root / "alike")]) == 0
    printed = capsys.readouterr().out
    assert "drift.length_ks: 0" in printed and "drift score 0.0" in printed
    assert main(["eval", str(root / "out"), "--drift", str(root / "unlike"), "--out", str(root / "d2")]) == 3
    err = capsys.readouterr().err
    assert "error: drift score" in err and "is above the threshold 0.3" in err
    report = json.loads((root / "d2" / "eval_report.json").read_text())
    assert report["evaluations"][0]["metrics"]["length_ks"]["tuned"] == 1.0


def test_validate_reads_the_eval_data_relative_to_the_config(tmp_path, capsys):
    model, data = make_assets(tmp_path, n_records=8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "eval.jsonl").write_text(data.read_text())
    section = {"tasks": {"dataset": {"path": "eval.jsonl"}}, "needle": {"lengths": [32], "trials": 1}}
    config = write_yaml(tmp_path / "sub" / "c.yaml", base_config(model, data, tmp_path / "out", eval=section))
    assert main(["validate", str(config)]) == 0
    assert "eval: tasks, loss, needle (data read and tokenized)" in capsys.readouterr().out
    code = main(["validate", str(config), "eval.tasks.dataset.path=missing.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.jsonl" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
