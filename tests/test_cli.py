"""Tests for the `mistral-tune` command: bad input ends in one `error:` line, exit 2, and no output_dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mistral_tune.cli import main
from mistral_tune.errors import ConfigError

COMMANDS = ["train", "validate", "merge", "quickstart", "init-model", "report"]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


class Workspace:
    """A folder with a valid config (tiny model, small chat dataset); tests break one thing each."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root = root
        self.out = root / "out"
        self.data = write_jsonl(root / "train.jsonl", [chat(f"Say {w}.", w) for w in ["red", "green", "blue", "cyan"]])
        self.settings = {
            "base_model": str(model_dir),
            "datasets": [{"path": "train.jsonl"}],
            "sequence_len": 64,
            "lora_r": 4,
            "max_steps": 2,
            "output_dir": str(self.out),
        }
        self.config = self.write_config()

    def write_config(self, **changes) -> Path:
        path = self.root / "config.yaml"
        path.write_text(yaml.safe_dump({**self.settings, **changes}, sort_keys=False))
        return path

    def dataset(self, lines: list, name: str = "bad.jsonl") -> Path:
        path = write_jsonl(self.root / name, lines)
        self.write_config(datasets=[{"path": name}])
        return path


@pytest.fixture
def ws(tmp_path: Path, tiny_model_dir: Path) -> Workspace:
    return Workspace(tmp_path, tiny_model_dir)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------- the installed command


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "mistral-tune"
    if script.is_file():
        return [str(script)]
    found = shutil.which("mistral-tune")
    return [found] if found else [sys.executable, "-m", "mistral_tune.cli"]


def test_help_lists_the_commands() -> None:
    proc = subprocess.run([*_console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


def test_subprocess_error_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MISTRAL_TUNE_DEBUG"}
    proc = subprocess.run(
        [*_console_script(), "train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: config file not found: {tmp_path / 'missing.yaml'}"]
    assert list(tmp_path.iterdir()) == []


def test_no_command_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_debug_flag_raises_with_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_env_debug_raises(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MISTRAL_TUNE_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["validate", str(tmp_path / "missing.yaml")])


# ---------------------------------------------------------------------- bad input: config


@pytest.mark.parametrize("command", ["train", "validate"])
def test_missing_config_file(ws: Workspace, capsys, command: str) -> None:
    code, _, err = run_cli(capsys, command, ws.root / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", str(ws.root / "nope.yaml"))
    assert not ws.out.exists()


def test_config_with_unknown_key(ws: Workspace, capsys) -> None:
    ws.write_config(learning_rat=0.1)
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, str(ws.config), "unknown key 'learning_rat'", "did you mean 'learning_rate'")
    assert not ws.out.exists()


def test_bad_override_on_the_command_line(ws: Workspace, capsys) -> None:
    code, _, err = run_cli(capsys, "train", ws.config, "lora_dropout=1.5")
    assert_one_line_error(code, err, "lora_dropout", "1.5", "< 1")
    assert not ws.out.exists()


def test_overrides_after_an_option_are_applied(ws: Workspace, capsys) -> None:
    # argparse alone would reject `lora_r=0` here as an unrecognized argument (usage error)
    code, _, err = run_cli(capsys, "train", ws.config, "--merge", "lora_r=0")
    assert_one_line_error(code, err, "key 'lora_r' has value 0")
    assert not ws.out.exists()


def test_unknown_option_is_still_a_usage_error(ws: Workspace, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", str(ws.config), "--mrege"])
    assert info.value.code == 2
    assert "unrecognized arguments: --mrege" in capsys.readouterr().err


# ---------------------------------------------------------------------- bad input: data


def test_dataset_line_that_is_not_json(ws: Workspace, capsys) -> None:
    path = ws.dataset([chat("a", "b"), '{"messages": [}'])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, f"{path}:2:", "not valid JSON")
    assert not ws.out.exists()


def test_dataset_line_that_is_not_an_object(ws: Workspace, capsys) -> None:
    path = ws.dataset([chat("a", "b"), chat("c", "d"), "[1, 2]"])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, f"{path}:3:", "expected a JSON object")
    assert not ws.out.exists()


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"instruction": "Translate this."}, "missing field 'output'"),
        ({"question": "x", "answer": "y"}, "cannot tell the format"),  # prompt/completion is a format now
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "content must be a string"),
        ({"messages": []}, "non-empty list"),
    ],
)
def test_record_lacking_its_fields(ws: Workspace, capsys, record: dict, reason: str) -> None:
    path = ws.dataset([chat("a", "b"), record])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, f"{path}:2:", reason, "1 bad record(s)")
    assert not ws.out.exists()


def test_many_bad_records_are_counted_and_the_first_shown(ws: Workspace, capsys) -> None:
    path = ws.dataset([{"text": ""}] * 8)
    code, _, err = run_cli(capsys, "validate", ws.config)
    line = assert_one_line_error(code, err, "8 bad record(s)", f"{path}:1:", "and 3 more")
    assert f"{path}:6:" not in line
    assert not ws.out.exists()


def test_conversation_not_ending_with_the_assistant(ws: Workspace, capsys) -> None:
    bad = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    }
    path = ws.dataset([chat("x", "y"), chat("z", "w"), bad])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, f"{path}:3:", "last message must be from the assistant")
    assert not ws.out.exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_file(ws: Workspace, capsys, content: str) -> None:
    path = ws.root / "empty.jsonl"
    path.write_text(content)
    ws.write_config(datasets=[{"path": "empty.jsonl"}])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, str(path), "empty")
    assert not ws.out.exists()


def test_dataset_file_not_found(ws: Workspace, capsys) -> None:
    ws.write_config(datasets=[{"path": "nowhere.jsonl"}])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, "dataset file not found", "nowhere.jsonl")
    assert not ws.out.exists()


def test_mistyped_dataset_path_is_file_not_found(ws: Workspace, capsys, monkeypatch) -> None:
    (ws.root / "data").mkdir()
    write_jsonl(ws.root / "data" / "alpaca.json", [chat("a", "b")])
    monkeypatch.chdir(ws.root)
    ws.write_config(datasets=[{"path": "data/alpaka.json"}])  # "owner/name" in form, but a file's name
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, "dataset file not found: data/alpaka.json", "did you mean data/alpaca.json?")
    assert not ws.out.exists()


def test_every_sample_longer_than_sequence_len(ws: Workspace, capsys) -> None:
    ws.dataset([chat("word " * 40, "fine " * 10)] * 3)
    code, _, err = run_cli(capsys, "train", ws.config, "sequence_len=32")
    assert_one_line_error(code, err, "no usable sample in 3 record(s)", "3 longer than sequence_len=32")
    assert not ws.out.exists()


def test_every_sample_without_trained_tokens(ws: Workspace, capsys) -> None:
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}
    ws.dataset([record, record])
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, "no usable sample in 2 record(s)", "2 with no assistant tokens")
    assert not ws.out.exists()


def test_val_set_size_leaving_nothing_to_train(ws: Workspace, capsys) -> None:
    code, _, err = run_cli(capsys, "train", ws.config, "val_set_size=4")
    assert_one_line_error(code, err, "val_set_size 4", "4 of 4 samples")
    assert not ws.out.exists()


# ---------------------------------------------------------------------- bad input: model, tokenizer, output


@pytest.mark.parametrize("command", ["train", "validate"])
def test_base_model_path_that_does_not_exist(ws: Workspace, capsys, command: str) -> None:
    missing = ws.root / "no-such-model"
    code, _, err = run_cli(capsys, command, ws.config, f"base_model={missing}")
    assert_one_line_error(code, err, "base_model", str(missing), "not found")
    assert not ws.out.exists()


def test_base_model_directory_without_a_checkpoint(ws: Workspace, capsys) -> None:
    empty = ws.root / "empty-model"
    empty.mkdir()
    code, _, err = run_cli(capsys, "train", ws.config, f"base_model={empty}", "tokenizer=v3")
    assert_one_line_error(code, err, str(empty), "config.json")
    assert not ws.out.exists()


def test_tokenizer_vocabulary_not_matching_the_model(ws: Workspace, capsys) -> None:
    code, _, err = run_cli(capsys, "train", ws.config, "tokenizer=tekken")
    assert_one_line_error(code, err, "tokenizer", "131072 tokens", "32768 rows")
    assert not ws.out.exists()


def test_tokenizer_that_does_not_exist(ws: Workspace, capsys) -> None:
    code, _, err = run_cli(capsys, "train", ws.config, "tokenizer=v9")
    assert_one_line_error(code, err, "tokenizer 'v9'", "v1, v3, v7, tekken")
    assert not ws.out.exists()


def test_output_dir_exists_and_is_not_empty(ws: Workspace, capsys) -> None:
    ws.out.mkdir()
    (ws.out / "keep.txt").write_text("precious")
    for overwrite in ("false", "true"):  # not ours: overwrite_output_dir does not make it so
        code, _, err = run_cli(capsys, "train", ws.config, f"overwrite_output_dir={overwrite}")
        assert_one_line_error(code, err, "output_dir", str(ws.out), "not empty", "not written by mistral-tune")
    assert [p.name for p in ws.out.iterdir()] == ["keep.txt"]
    assert (ws.out / "keep.txt").read_text() == "precious"


def test_merge_of_a_directory_without_an_adapter(ws: Workspace, capsys) -> None:
    code, _, err = run_cli(capsys, "merge", ws.root)
    assert_one_line_error(code, err, str(ws.root), "adapter")
    assert not (ws.root / "merged").exists()


def test_train_without_base_model(ws: Workspace, capsys) -> None:
    ws.settings.pop("base_model")
    ws.write_config(tokenizer="v3")
    code, _, err = run_cli(capsys, "train", ws.config)
    assert_one_line_error(code, err, "missing key 'base_model'")
    assert not ws.out.exists()


def test_data_commands_need_only_a_tokenizer(ws: Workspace, capsys) -> None:
    ws.settings.pop("base_model")
    ws.write_config(tokenizer="v3", dataset_cache_dir=str(ws.root / "cache"))
    code, out, err = run_cli(capsys, "data", "validate", ws.config)
    assert (code, err) == (0, "") and "data OK" in out
    code, out, err = run_cli(capsys, "data", "inspect", ws.config, "--out", "", "--color", "never")
    assert (code, err) == (0, "") and "== 3 sample(s)" in out
    ws.write_config()  # neither a tokenizer nor a model
    code, _, err = run_cli(capsys, "data", "validate", ws.config)
    assert_one_line_error(code, err, "set tokenizer", "or base_model")


# ---------------------------------------------------------------------- validate


def test_validate_warns_about_positions_and_the_tokenizer_version(ws: Workspace, capsys) -> None:
    code, out, err = run_cli(capsys, "validate", ws.config)
    assert code == 0 and "warning" not in out
    code, out, err = run_cli(capsys, "validate", ws.config, "sequence_len=8192", "tokenizer=v7")
    assert code == 0, err
    assert "warning: sequence_len 8192 is more than the model's max_position_embeddings 4096" in out
    assert ("warning: tokenizer: v7 is SentencePiece v7, but the model folder ships tokenizer.model.v3 "
            "(SentencePiece v3)") in out


def test_validate_prints_the_data_report_and_writes_nothing(ws: Workspace, capsys) -> None:
    # one conversation too long for sequence_len: dropped and counted, not an error
    ws.dataset([chat(f"Say {w}.", w) for w in ["red", "green", "blue"]] + [chat("word " * 40, "ok")], "mix.jsonl")
    before = sorted(p.name for p in ws.root.iterdir())
    code, out, err = run_cli(capsys, "validate", ws.config, "sequence_len=32")
    assert code == 0, err
    assert err == ""
    assert "config OK" in out
    assert "Mistral (1 layers, hidden 64" in out and "vocab 32768" in out
    assert "4 records from 1 file(s) -> 3 samples (3 train + 0 held out)" in out
    assert "dropped 1 conversation(s) longer than sequence_len" in out
    assert "trained (" in out
    assert sorted(p.name for p in ws.root.iterdir()) == before
    assert not ws.out.exists()


def test_init_model_writes_a_loadable_model(tmp_path: Path, capsys) -> None:
    from mistral_tune.models.load import read_config

    code, out, err = run_cli(capsys, "init-model", tmp_path / "m", "--tokenizer", "v3", "--seed", "1")
    assert code == 0, err
    assert "written to" in out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "tokenizer.model.v3").is_file()
    assert read_config(tmp_path / "m").vocab_size == 32768


def test_quickstart_stopped_by_a_signal_says_so_and_evaluates_nothing(tmp_path, monkeypatch):
    from mistral_tune.quickstart import run_quickstart
    from mistral_tune.train import loop

    def stopped(cfg, echo=print, merge=False, force=False):
        return loop.TrainResult(Path(cfg.output_dir), None, None, 3, 1.0, None, stopped_by="SIGTERM",
                                checkpoint_dir=Path(cfg.output_dir) / "checkpoint-3")

    monkeypatch.setattr(loop, "train", stopped)
    lines = []
    summary = run_quickstart(tmp_path, echo=lines.append)
    assert summary == {"stopped_by": "SIGTERM", "checkpoint_dir": str(tmp_path / "run" / "checkpoint-3")}
    assert "stopped by SIGTERM" in lines[-1]


def test_counts_add_up_with_dataset_weights_and_plan_counts_what_validate_calls_an_epoch(ws: Workspace, capsys):
    """Weights repeat one dataset and thin another: the unique samples are train + held out, the epoch's
    training samples are the mix's sum, and `plan` counts the epoch's samples and tokens `validate` prints."""
    write_jsonl(ws.root / "a.jsonl", [chat(f"Say {w} {i}.", f"{w} {i}") for i in range(4) for w in ("red", "blue")])
    write_jsonl(ws.root / "b.jsonl", [chat(f"Name the number {i}.", f"It is {i}.") for i in range(10)])
    ws.write_config(datasets=[{"path": "a.jsonl", "weight": 2}, {"path": "b.jsonl", "weight": 0.5}], val_set_size=4)
    code, out, err = run_cli(capsys, "validate", ws.config)
    assert code == 0, err
    samples, train, held_out = map(int, re.search(r"-> (\d+) samples \((\d+) train \+ (\d+) held out\)", out).groups())
    assert samples == train + held_out == 18 and held_out == 4
    epoch, epoch_tokens = re.search(r"an epoch after dataset weights: (\d+) training samples .*?, ([\d,]+) tokens",
                                    out).groups()
    mix = re.search(r"mix per epoch: (.*)", out).group(1)
    assert int(epoch) == sum(int(n) for n in re.findall(r": (\d+)", mix)) != train
    code, out, err = run_cli(capsys, "plan", ws.config, "--gpu", "H100")
    assert code == 0, err
    assert re.search(r"an epoch: ([\d,]+) training samples, ([\d,]+) tokens", out).groups() == (epoch, epoch_tokens)


def test_data_inspect_prints_the_paths_its_files_have_once_written(ws: Workspace, capsys):
    """Its files are written in a temporary folder renamed into place: the printed paths are the final ones."""
    ws.dataset([chat("Say red.", "red"), "{not json", chat("Say blue.", "blue")])
    code, out, err = run_cli(capsys, "data", "inspect", ws.config, "--out", ws.root / "look", "--color", "never",
                             "on_bad_record=skip", "dataset_cache=false")
    assert code == 0, err
    printed = {Path(p) for p in re.findall(r"(/\S+\.(?:png|html|jsonl))\b", out)}
    assert {p.name for p in printed} >= {"lengths.png", "samples.html", "rejects.jsonl"}
    assert [p for p in printed if not p.is_file()] == []
    assert (ws.root / "look" / "samples.html") in printed
