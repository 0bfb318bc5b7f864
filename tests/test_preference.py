"""Preference data (rendering, the record layouts, bad records) and the preference methods in the
training loop (metrics, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _runs import config, make_assets, metrics
from mistral_tune.chat import load_tokenizer
from mistral_tune.config import config_from_dict
from mistral_tune.data.preference import build_preference_dataset, pair_samples, unit_rows
from mistral_tune.errors import ConfigError, DataError
from mistral_tune.quickstart import data_dir
from mistral_tune.train.loop import train

USER = {"role": "user", "content": "Last word? red green blue"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _pref_cfg(tmp_path: Path, data: Path, **overrides):
    return config_from_dict({"base_model": "unused", "datasets": [{"path": str(data)}], "sequence_len": 64,
                             "method": "dpo", **overrides})


def test_a_pair_renders_as_mistral_common_with_only_the_answer_trained(tok):
    record = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "blue"}], "rejected": "red"}
    c_ids, c_mask, r_ids, r_mask = pair_samples(record, tok)
    for ids, mask, answer in ((c_ids, c_mask, "blue"), (r_ids, r_mask, "red")):
        start = tok.encode_prompt([USER])
        assert ids[:len(start)] == start and not any(mask[:len(start)])
        assert ids == tok.encode_chat([USER, {"role": "assistant", "content": answer}])[0]
        assert all(mask[len(start):])  # the answer and its </s>
        assert tok.decode(ids[len(start):]) == answer


def test_a_multi_turn_prompt_trains_only_the_final_answer(tok):
    earlier = [USER, {"role": "assistant", "content": "blue"}, {"role": "user", "content": "And the first?"}]
    c_ids, c_mask, _, _ = pair_samples({"prompt": earlier, "chosen": "red", "rejected": "green"}, tok)
    assert tok.decode([i for i, m in zip(c_ids, c_mask, strict=True) if m]) == "red"


def test_shared_prefix_conversations_give_the_explicit_prompt_samples(tok):
    a, b = {"role": "assistant", "content": "blue"}, {"role": "assistant", "content": "red"}
    explicit = pair_samples({"prompt": [USER], "chosen": [a], "rejected": [b]}, tok)
    whole = pair_samples({"chosen": [USER, a], "rejected": [USER, b]}, tok)
    assert explicit == whole


@pytest.mark.parametrize("record, reason", [
    ({"prompt": [USER], "chosen": "blue", "rejected": "blue"}, "same answer"),
    ({"chosen": [USER, {"role": "assistant", "content": "x"}], "rejected": [USER, {"role": "assistant",
                                                                                  "content": "x"}]},
     "same conversation"),
    ({"prompt": [USER], "chosen": "", "rejected": "red"}, "empty"),
    ({"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "must end with a user message"),
    ({"prompt": [USER], "chosen": "blue"}, "needs chosen and rejected"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "share no user turn"),
])
def test_bad_pairs_are_named_with_file_and_line(tmp_path, tok, record, reason):
    good = {"prompt": [USER], "chosen": "blue", "rejected": "red"}
    data = _write(tmp_path / "p.jsonl", [good, record])
    with pytest.raises(DataError, match=rf"1 bad preference pair record\(s\): {data}:2: .*{reason}"):
        build_preference_dataset(_pref_cfg(tmp_path, data), tok)
    kept = build_preference_dataset(_pref_cfg(tmp_path, data, on_bad_record="skip"), tok)
    assert kept.report.rejected == 1 and len(kept.train) == 2


def test_too_long_pairs_are_dropped_and_counted(tmp_path, tok):
    long = {"prompt": [USER], "chosen": "word " * 80, "rejected": "red"}
    data = _write(tmp_path / "p.jsonl", [{"prompt": [USER], "chosen": "blue", "rejected": "red"}, long])
    built = build_preference_dataset(_pref_cfg(tmp_path, data), tok)
    assert built.report.dropped_too_long == 1 and len(built.train) == 2
    assert any(f"{data}:2: too long" in e for e in built.report.bad_examples)


def test_kto_records_and_their_mismatched_samples(tmp_path, tok):
    records = [{"prompt": f"Last word? a b w{i}", "completion": f"w{i}", "label": i % 2 == 0} for i in range(4)]
    data = _write(tmp_path / "k.jsonl", records + [{"prompt": "x", "completion": "y", "label": "yes"}])
    with pytest.raises(DataError, match=rf"{data}:5: label: expected true or false"):
        build_preference_dataset(_pref_cfg(tmp_path, data, method="kto"), tok)
    built = build_preference_dataset(_pref_cfg(tmp_path, data, method="kto", on_bad_record="skip"), tok)
    assert built.train_labels == [True, False, True, False]
    # unit u: its own answer, then its prompt with the next record's answer
    assert tok.decode(built.train[1].tokens + [built.train[1].labels[-1]]).endswith("w1")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "x"]),
                       st.one_of(st.text(max_size=8), st.integers(), st.none(),
                                 st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                          st.sampled_from(["user", "assistant", "", "hi", 3])),
                                          max_size=3))))
def test_any_record_is_a_pair_or_a_named_reason(tok, record):
    try:
        pair_samples(record, tok)
    except (ValueError, DataError) as exc:
        assert str(exc)


def test_unit_rows_keep_pairs_whole(tok):
    lengths = [5, 7, 3, 3, 10, 2]

    class S:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    samples = [S(n) for n in lengths]
    for packing in (True, False):
        rows = unit_rows(samples, 10, packing)
        assert sorted(i for r in rows for i in r) == list(range(6))
        assert all(r[k] % 2 == 0 and r[k + 1] == r[k] + 1 for r in rows for k in range(0, len(r), 2))
        assert all(sum(lengths[i] for i in r) <= 20 for r in rows)


def test_unknown_and_foreign_preference_keys_are_config_errors():
    base = {"datasets": [{"path": "x"}]}
    with pytest.raises(ConfigError, match="preference.gamma: for method simpo, not dpo"):
        config_from_dict({**base, "method": "dpo", "preference": {"gamma": 1.0}})
    with pytest.raises(ConfigError, match="method is sft"):
        config_from_dict({**base, "preference": {"beta": 0.2}})
    assert config_from_dict({**base, "method": "simpo"}).beta == 2.0
    by_accuracy = {"eval": {"metric": "preference.accuracy"}}
    with pytest.raises(ConfigError, match="preference.accuracy is measured on .* held-out pairs; method is sft"):
        config_from_dict({**base, **by_accuracy, "val_set_size": 2})
    with pytest.raises(ConfigError, match="preference.accuracy .* give val_set_size or val_datasets"):
        config_from_dict({**base, **by_accuracy, "method": "dpo"})
    assert config_from_dict({**base, **by_accuracy, "method": "dpo", "val_set_size": 2}).eval.requested


# ---------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    lines = (data_dir() / "preference_train.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dpo_run(assets, pref_data, tmp_path_factory):
    model, _ = assets
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = config(model, pref_data, out, method="dpo", datasets=[{"path": str(pref_data)}], max_steps=4,
                 save_steps=2, val_set_size=4, eval_steps=2, lora_dropout=0.1, save_total_limit=10)
    return cfg, train(cfg, echo=lambda _: None)


def test_a_dpo_run_logs_its_metrics_and_held_out_accuracy(dpo_run):
    _, result = dpo_run
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "lr" in x]
    assert len(steps) == 4 and result.adapter_dir.is_dir()
    first = steps[0]
    # the first step's policy is the reference: every reward is 0 (up to dropout, which is on)
    assert set(first) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
                          "logps/chosen", "logps/rejected"}
    assert first["loss"] == pytest.approx(0.6931, abs=0.01)
    evals = [x for x in lines if "eval_preference_accuracy" in x]
    assert [x["step"] for x in evals] == [2, 4]
    assert all(0 <= x["eval_preference_accuracy"] <= 1 for x in evals)


def test_a_dpo_run_resumes_exactly(dpo_run, tmp_path):
    import shutil

    cfg, result = dpo_run
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    again = train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-2")}),
                  echo=lambda _: None)
    assert again.steps == 4
    assert metrics(out) == metrics(result.output_dir)
    mine = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert mine == (result.adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_runs_train(assets, tmp_path, pref_data, method):
    model, _ = assets
    data = pref_data
    if method == "kto":
        pairs = [json.loads(x) for x in pref_data.read_text().splitlines()]
        data = _write(tmp_path / "kto.jsonl", [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                                               for p in pairs for k in ("chosen", "rejected")])
    cfg = config(model, data, tmp_path / "run", method=method, datasets=[{"path": str(data)}], max_steps=2,
                 save_steps=10)
    result = train(cfg, echo=lambda _: None)
    steps = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert ("kl" if method == "kto" else "nll") in steps[0]


# ---------------------------------------------------------------------- init_from and the evaluation report


@pytest.fixture(scope="module")
def sft_run(dpo_run):
    """The earlier run whose adapter init_from starts from: the DPO run above will do (any run's adapter)."""
    return dpo_run[1]


@pytest.fixture(scope="module")
def heldout_pairs(tmp_path_factory) -> Path:
    lines = (data_dir() / "preference_heldout.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("pref_val") / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dpo_from_sft(assets, pref_data, heldout_pairs, sft_run, tmp_path_factory):
    """A DPO run from the SFT run's adapter, with held-out pairs and an eval: section (forgetting)."""
    model, _ = assets
    general = {"path": str(data_dir() / "general.jsonl"), "format": "text"}
    cfg = config(model, pref_data, tmp_path_factory.mktemp("dpo_init") / "run", method="dpo",
                 datasets=[{"path": str(pref_data)}], val_datasets=[{"path": str(heldout_pairs)}],
                 init_from=str(sft_run.output_dir), max_steps=2, save_steps=1, save_total_limit=5,
                 eval={"forgetting": {"dataset": general, "max_samples": 2}, "during_training": False})
    lines: list[str] = []
    return cfg, train(cfg, echo=lines.append), lines


def _peft_margins(model_dir: Path, adapter: Path, pairs: Path, tok) -> tuple[list[float], list[float]]:
    """Per pair, with the adapter and with it off: log p(chosen) - log p(rejected) over the answer tokens, by
    transformers + PEFT."""
    import transformers
    from peft import PeftModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    hf = PeftModel.from_pretrained(hf, str(adapter)).eval()

    def margin(record) -> float:
        c_ids, c_mask, r_ids, r_mask = pair_samples(record, tok)
        logps = []
        for ids, mask in ((c_ids, c_mask), (r_ids, r_mask)):
            logits = hf(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            lp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logps.append(float(lp[torch.tensor(mask[1:])].sum()))
        return logps[0] - logps[1]

    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    with torch.no_grad():
        on = [margin(r) for r in records]
        with hf.disable_adapter():
            off = [margin(r) for r in records]
    return on, off


def test_init_from_starts_at_the_sft_adapter_which_is_the_reference(dpo_from_sft, sft_run, assets, heldout_pairs,
                                                                   tok):
    cfg, result, lines = dpo_from_sft
    assert any(f"init_from: the adapter starts as {sft_run.adapter_dir}" in x for x in lines)
    steps = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    first = steps[0]
    # the first step's policy is the reference (no dropout): rewards 0, loss log 2
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["loss"] == pytest.approx(0.693147, abs=1e-5)
    report = json.loads((result.output_dir / "eval" / "eval_report.json").read_text())
    pref = next(e for e in report["evaluations"] if e["name"] == "preference")
    # the reference's held-out margins are those of the base + SFT adapter as transformers and PEFT compute them
    model, _ = assets
    with_sft, base_only = _peft_margins(model, sft_run.adapter_dir, heldout_pairs, tok)
    assert pref["metrics"]["margin"]["base"] == pytest.approx(sum(with_sft) / 4, abs=1e-4)
    assert abs(sum(with_sft) - sum(base_only)) > 1e-3  # the SFT adapter matters: not the base twice
    assert pref["metrics"]["accuracy"]["base"] == sum(m > 0 for m in with_sft) / 4


def test_held_out_preference_accuracy_is_in_the_evaluation_and_run_reports(dpo_from_sft):
    _, result, _ = dpo_from_sft
    report = json.loads((result.output_dir / "eval" / "eval_report.json").read_text())
    by_name = {e["name"]: e for e in report["evaluations"]}
    assert {"preference", "forgetting"} <= set(by_name)  # next to the forgetting metrics
    accuracy = by_name["preference"]["metrics"]["accuracy"]
    assert set(accuracy) == {"base", "tuned"} and all(0 <= v <= 1 for v in accuracy.values())
    evals = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in evals if "eval_preference_accuracy" in x][-1]
    assert accuracy["tuned"] == pytest.approx(last["eval_preference_accuracy"])  # the loop's own measure
    html = (result.output_dir / "eval" / "report.html").read_text()
    assert "preference" in html and "accuracy" in html and "4 held-out pairs" in html
    assert "eval_preference_accuracy" in (result.output_dir / "report.html").read_text()


def test_a_run_from_init_from_resumes_exactly(dpo_from_sft, tmp_path):
    import shutil

    cfg, result, _ = dpo_from_sft
    out = tmp_path / "run"
    shutil.copytree(result.output_dir, out)
    again = train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-1")}),
                  echo=lambda _: None)
    assert again.steps == 2 and metrics(out) == metrics(result.output_dir)
    mine = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert mine == (result.adapter_dir / "adapter_model.safetensors").read_bytes()


def test_init_from_mistakes_are_config_errors_before_anything_is_written(assets, pref_data, sft_run, tmp_path):
    model, _ = assets
    base = dict(method="dpo", datasets=[{"path": str(pref_data)}], max_steps=1)
    for overrides, message in (
        ({"init_from": str(tmp_path / "nowhere")}, "init_from: .*nowhere: no LoRA adapter there"),
        ({"init_from": str(sft_run.output_dir), "lora_r": 8}, r"init_from: .* has lora_r 4; this config lora_r 8"),
        ({"init_from": str(sft_run.adapter_dir), "adapter": "qlora"}, "init_from: .* set adapter: lora"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(config(model, pref_data, tmp_path / "run", **base, **overrides), echo=lambda _: None)
        assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="init_from: starts a LoRA adapter"):
        config(model, pref_data, tmp_path / "run", **base, init_from=str(sft_run.output_dir), adapter="none")


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_the_preference_quickstart_configs_are_valid(tmp_path, method):
    from mistral_tune.config import load_config
    from mistral_tune.quickstart import write_preference_configs

    sft_path, path = write_preference_configs(tmp_path, tmp_path / "base-model", method)
    sft, cfg = load_config(sft_path), load_config(path)
    assert sft.method == "sft" and sft.datasets[0].path.endswith("preference_sft.jsonl")
    assert cfg.method == method and cfg.init_from == str(tmp_path / "sft-run") and cfg.eval.forgetting is not None
    first = json.loads(Path(cfg.datasets[0].path).read_text().splitlines()[0])
    assert ("label" in first) == (method == "kto")
