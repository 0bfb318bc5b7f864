"""The Python API (mistral_tune.api): a config as a dict, a file or a Config; train, evaluate, merge and
generate return what a notebook uses; the commands give the same results through it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _runs import SRC
from mistral_tune import api
from mistral_tune.cli import main
from mistral_tune.config import Config
from mistral_tune.errors import ConfigError


def test_importing_the_api_and_the_cli_loads_no_torch() -> None:
    code = "import sys, mistral_tune, mistral_tune.api, mistral_tune.cli; print(sorted(m for m in sys.modules " \
           "if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_train_returns_the_run_its_metrics_and_evaluation(tiny_run) -> None:
    run = tiny_run
    assert run.stopped_by is None and run.steps == 4
    assert run.adapter_dir == run.output_dir / "adapter" and run.model_dir is None
    steps = [r for r in run.metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["loss"] == run.final_train_loss
    evaluated = [r for r in run.metrics if "forgetting.kl" in r]
    assert evaluated and evaluated[-1]["step"] == 4
    report = run.evaluation
    assert report == json.loads((run.output_dir / "eval" / "eval_report.json").read_text())
    assert {ev["name"] for ev in report["evaluations"]} == {"tasks", "loss", "forgetting"}
    assert report["evaluations"][0]["metrics"]["exact_match"].keys() == {"base", "tuned"}


def test_a_config_is_a_dict_a_file_or_a_config(tiny_run, tmp_path: Path) -> None:
    data = yaml.safe_load((tiny_run.output_dir / "config.yaml").read_text())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    from_dict, from_file = api.load_config(data), api.load_config(path)
    assert isinstance(from_dict, Config) and from_dict == from_file
    assert api.load_config(from_dict) is from_dict
    # overrides as on the command line, on each form; the caller's dict is left as it was
    for form in (data, path, from_dict):
        cfg = api.load_config(form, ["lora_r=8", "eval.tasks.max_samples=1"])
        assert cfg.lora_r == 8 and cfg.eval.tasks.max_samples == 1 and cfg.seed == from_dict.seed
    assert data["lora_r"] == 4 and data["eval"]["tasks"]["max_samples"] == 2


@pytest.mark.parametrize("config, message", [
    ({"datasets": [{"path": "x.jsonl"}], "lora_rank": 8}, "unknown key 'lora_rank'"),
    (42, "a config is a dict, a YAML file's path or a Config, not int"),
    ("no-such-config.yaml", "config file not found: no-such-config.yaml"),
])
def test_a_bad_config_is_a_config_error_before_anything_runs(config, message, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.train(config)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_returns_the_report_it_writes(tiny_run, tmp_path: Path) -> None:
    lines: list[str] = []
    report = api.evaluate(tiny_run, out=tmp_path / "ev", echo=lines.append)
    written = json.loads((tmp_path / "ev" / "eval_report.json").read_text())
    assert {k: v for k, v in written.items() if k != "history"} == {k: v for k, v in report.items() if k != "history"}
    assert [ev["name"] for ev in report["evaluations"]] == [ev["name"] for ev in tiny_run.evaluation["evaluations"]]
    assert lines[-1] == f"report: {tmp_path / 'ev' / 'report.html'}"
    # the eval: section as a dict, for the adapter alone
    only = api.evaluate(tiny_run.adapter_dir, {"eval": {"needle": {"lengths": [32], "depths": [0.5], "trials": 1,
                                                                   "key_digits": 1}}},
                        out=tmp_path / "needle", echo=lines.append)
    assert [ev["name"] for ev in only["evaluations"]] == ["needle"]


def test_merge_and_generate_give_what_the_commands_give(tiny_run, tmp_path: Path, capsys) -> None:
    merged = api.merge(tiny_run, tmp_path / "merged", dtype="fp32", echo=lambda line: None)
    assert merged == tmp_path / "merged" and (merged / "model.safetensors").is_file()
    assert (merged / "README.md").is_file()
    prompts = ["Copy: red green", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
               {"prompt": "Copy: one two"}]
    answers = api.generate(merged, prompts, max_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # the command on the same prompts, as a file
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in
                            [{"prompt": prompts[0]}, {"messages": prompts[1]}, prompts[2]]))
    assert main(["generate", str(merged), str(file), "--out", str(tmp_path / "out.jsonl"), "--max-tokens", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == answers
    assert "3 completions written to" in capsys.readouterr().out
    # the API keeps its JSONL too when asked, under the same rules as the command's --out
    assert api.generate(merged, file, max_tokens=4, out=tmp_path / "kept.jsonl") == answers
    assert (tmp_path / "kept.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
    with pytest.raises(ConfigError, match="--temperature -1"):
        api.generate(merged, ["x"], temperature=-1)
    with pytest.raises(ConfigError, match="prompt 1: expected a string"):
        api.generate(merged, ["x", 7])
