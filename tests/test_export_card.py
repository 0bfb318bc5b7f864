"""Model cards (README.md) as huggingface_hub reads them, and what `mistral-tune push` would upload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from hypothesis import given, settings
from hypothesis import strategies as st

from _runs import SRC
from mistral_tune import api
from mistral_tune.errors import ConfigError
from mistral_tune.evaluate.report import REPORT_JSON
from mistral_tune.export.card import RUN_EVALUATION, card_text, hub_id
from mistral_tune.export.hub import push_source, upload_files, upload_patterns
from mistral_tune.fsutil import MARKER


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def test_the_run_evaluation_path_is_the_one_evaluate_writes() -> None:
    assert RUN_EVALUATION[-1] == REPORT_JSON


def test_the_adapter_card_of_a_run(tiny_run) -> None:
    card = ModelCard.load(tiny_run.adapter_dir / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"mistral-tune", "lora", "mistral"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local base: the Hub's base_model must name a Hub model
    text = card.text
    data = json.loads((tiny_run.output_dir / "data_report.json").read_text())
    assert f"| records read | {data['records']} |" in text and f"| trained tokens | {data['trained_tokens']} |" in text
    assert "- `train.jsonl` (messages): 16" in text
    assert "| lora_r | 4 |" in text and "| learning_rate | 0.01 |" in text and "| steps trained | 4 |" in text
    # the final evaluation, every metric, base vs tuned, as the run's evaluation report has it
    for ev in tiny_run.evaluation["evaluations"]:
        for metric, v in ev["metrics"].items():
            assert f"| {ev['name']} | {metric} | {_fmt(v.get('base', '-'))} | {_fmt(v['tuned'])} |" in text
    assert "PeftModel.from_pretrained(model, " in text and "--tokenizer-mode mistral --enable-lora" in text
    assert "--max-lora-rank 8" in text and "mistral-tune export gguf" in text


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory) -> Path:
    return api.merge(tiny_run, tmp_path_factory.mktemp("card") / "merged", echo=lambda line: None)


def test_the_merged_card_names_the_hub_base_and_carries_its_license(merged, tmp_path) -> None:
    # the base as huggingface_hub caches a Hub model, its own card beside its config
    snapshot = tmp_path / "hub" / "models--mistralai--Mistral-7B-v0.3" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    shutil.copy(merged / "config.json", snapshot / "config.json")
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: mrl\nlicense_link: "
                                        "https://mistral.ai/licenses/MRL-0.1.md\n---\n# base\n")
    card = ModelCard(card_text(merged, repo_id="someone/tuned", base_model=str(snapshot)))
    meta = card.data.to_dict()
    assert meta["base_model"] == "mistralai/Mistral-7B-v0.3" and meta["library_name"] == "transformers"
    assert (meta["license"], meta["license_name"]) == ("other", "mrl")
    assert meta["license_link"] == "https://mistral.ai/licenses/MRL-0.1.md"
    assert "lora" in meta["tags"]  # the method the run used, though this folder holds full weights
    text = card.text
    assert "# tuned" in text.splitlines()
    assert "A merged model of [mistralai/Mistral-7B-v0.3](https://huggingface.co/mistralai/Mistral-7B-v0.3)" in text
    assert 'AutoModelForCausalLM.from_pretrained("someone/tuned"' in text
    assert "vllm serve someone/tuned --tokenizer-mode mistral" in text
    assert "## Evaluation" in text  # the run's, found from the adapter the merge read


def test_merge_writes_the_card_with_the_model(merged) -> None:
    card = ModelCard.load(merged / "README.md")
    assert card.data.library_name == "transformers" and "# merged" in card.text
    assert "README.md" in upload_files(merged)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab/-_.~ :", max_size=12))
def test_hub_id_is_a_name_huggingface_hub_accepts(name: str) -> None:
    found = hub_id(name)
    if found is not None:
        validate_repo_id(found)  # raises if not
        assert found == name and name.count("/") == 1


def test_hub_id_of_a_cached_model_and_of_local_paths(tmp_path, monkeypatch) -> None:
    assert hub_id("/x/hub/models--mistralai--Mixtral-8x7B-v0.1/snapshots/abc") == "mistralai/Mixtral-8x7B-v0.1"
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/model") is None  # an existing local folder
    assert hub_id("mistralai/Mistral-7B-v0.3") == "mistralai/Mistral-7B-v0.3"
    with pytest.raises(HFValidationError):
        validate_repo_id("a--b/c")
    assert hub_id("a--b/c") is None


NAME = st.text(alphabet="ab.[]*?-_ ", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), NAME), min_size=1, max_size=8, unique_by=lambda t: t[1]))
def test_the_upload_is_exactly_the_listed_files(tmp_path_factory, entries) -> None:
    """What huggingface_hub's upload_folder keeps with our allow_patterns (its own filter) is the list,
    whatever glob characters the names hold; the marker and hidden files are not in it."""
    folder = tmp_path_factory.mktemp("up")
    for nested, name in entries:
        path = folder / "sub" / name if nested else folder / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    (folder / MARKER).write_text("{}")
    every = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    listed = upload_files(folder)
    assert listed == [f for f in every if f != MARKER and not any(p.startswith(".") for p in f.split("/"))]
    assert sorted(filter_repo_objects(every, allow_patterns=upload_patterns(listed))) == listed


def test_push_source_of_a_run(tiny_run, merged, tmp_path) -> None:
    assert push_source(tiny_run.output_dir) == tiny_run.adapter_dir  # no merged/ in this run
    assert push_source(merged) == merged
    with pytest.raises(Exception, match="no merged/ or model/ or adapter/ to push"):
        push_source(tmp_path)


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str] = []

    def _any(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_HEAD = _any

    def log_message(self, *args) -> None:
        """Quiet: the test reads `seen`, not the server's log."""


def test_push_without_a_token_stops_before_any_request(tiny_run, tmp_path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    card = (tiny_run.adapter_dir / "README.md").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(PYTHONPATH=str(SRC), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
    try:
        result = subprocess.run([sys.executable, "-m", "mistral_tune", "push", str(tiny_run.output_dir),
                                 "--repo", "someone/tuned"], env=env, capture_output=True, text=True)
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert result.stderr.startswith("error: no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    assert "nothing was uploaded" in result.stderr
    assert _Recorder.seen == []
    assert (tiny_run.adapter_dir / "README.md").read_text() == card  # not even the card was rewritten


@pytest.mark.parametrize("repo, message", [("not a name!", "not a Hub repository name"),
                                           ("tuned", "name the owner too, e.g. your-name/tuned")])
def test_push_to_a_bad_repository_name(tiny_run, repo, message) -> None:
    with pytest.raises(ConfigError, match=message):
        api.push(tiny_run, repo, token="hf_unused")
