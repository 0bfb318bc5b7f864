"""Tests for the training run: artifacts, learning, gradient accumulation, lr schedule, masking, determinism."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mistral_tune.chat import load_tokenizer
from mistral_tune.cli import main
from mistral_tune.config import config_from_dict, load_config
from mistral_tune.data.build import build_dataset
from mistral_tune.data.pack import IGNORE, Sample, collate
from mistral_tune.fsutil import output_kind
from mistral_tune.models.load import load_model
from mistral_tune.models.lora import LoraSpec, apply_lora
from mistral_tune.train import loop
from mistral_tune.train.loop import Runtime, accumulate_gradients, train
from mistral_tune.train.optim import lr_factor, warmup_steps

WORDS = ["red", "green", "blue", "cyan", "amber", "olive", "coral", "ivory"]


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_config(tmp_path: Path, model_dir: Path, data: Path, name: str = "run", **settings):
    values = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data)}],
        "sequence_len": 64,
        "lora_r": 4,
        "output_dir": str(tmp_path / name),
        **settings,
    }
    return config_from_dict(values)


def quiet(*_args) -> None:
    pass


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl; every line must be valid JSON."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


@pytest.fixture
def color_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "colors.jsonl", [chat(f"Name the colour {w}.", f"The colour is {w}.") for w in WORDS])


# ---------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_end_to_end_writes_every_artifact(tmp_path: Path, tiny_model_dir: Path, color_data: Path, capsys) -> None:
    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_model_dir),
                "datasets": [{"path": color_data.name}],  # relative to the config file
                "sequence_len": 64,
                "val_set_size": 2,
                "lora_r": 4,
                "learning_rate": 0.02,
                "lr_scheduler": "constant",
                "micro_batch_size": 2,
                "max_steps": 6,
                "output_dir": str(out),
            }
        )
    )
    code = main(["train", str(config), "--merge", "seed=7"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "8 records from 1 file(s) -> 8 samples (6 train + 2 held out)" in stdout
    assert "trained 6 steps; final train loss" in stdout and "held-out loss" in stdout
    assert f"adapter: {out / 'adapter'}" in stdout
    assert f"model:   {out / 'merged'}" in stdout

    # metrics.jsonl: one valid JSON line per step, then the held-out evaluation
    train_records, eval_records = read_metrics(out)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    for r in train_records:
        for key in ("step", "loss", "lr", "grad_norm", "trained_tokens", "epoch"):
            assert key in r
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["lr"] == pytest.approx(0.02)
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    # Throughput is over recent steps' own time: the first step's rate times its duration is its
    # tokens (at least the trained ones), whatever happened before the loop started.
    first = train_records[0]
    assert first["tokens_per_s"] * first["step_s"] >= first["trained_tokens"] * (1 - 1e-9)
    assert first["tokens_per_s"] * first["step_s"] <= 2 * 64 * (1 + 1e-9)  # micro-batch 2 rows of <= 64
    # Held-out loss is measured at every checkpoint (each epoch end here) and at the last step.
    assert eval_records[-1]["step"] == 6
    assert all(r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"])) for r in eval_records)

    # tensorboard event files with the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_loss = [e.value for e in events.Scalars("train/loss")]
    assert tb_loss == pytest.approx([r["loss"] for r in train_records], rel=1e-6)
    assert "eval/loss" in events.Tags()["scalars"]

    # config.yaml reproduces the run; data_report.json counts the data
    saved = load_config(out / "config.yaml")
    assert saved.seed == 7 and saved.max_steps == 6 and saved.val_set_size == 2
    assert Path(saved.datasets[0].path).resolve() == color_data.resolve()
    report = json.loads((out / "data_report.json").read_text())
    assert report["records"] == 8 and report["train_samples"] == 6 and report["val_samples"] == 2
    assert 0 < report["trained_tokens"] < report["tokens"]

    # the PEFT adapter, with the tokenizer beside it
    adapter = out / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert Path(adapter_config["base_model_name_or_path"]) == tiny_model_dir.resolve()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7  # lora_A and lora_B of the seven projections of one layer
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    assert (adapter / "tokenizer.model.v3").is_file()

    # --merge: an HF model directory whose weights moved away from the base
    merged = out / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.model.v3"):
        assert (merged / name).is_file()
    base_w = load_file(str(tiny_model_dir / "model.safetensors"))
    merged_w = load_file(str(merged / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base_w[key], merged_w[key])
    assert torch.equal(base_w["model.embed_tokens.weight"], merged_w["model.embed_tokens.weight"])
    for d in (out, out / "adapter", merged):  # no temporary directories left; each output marked as ours
        assert [p.name for p in d.iterdir() if p.name.startswith(".")] == [".mistral-tune.json"]
    assert [output_kind(d) for d in (out, out / "adapter", merged)] == ["run", "adapter", "merged"]


@pytest.mark.slow
def test_loss_decreases_on_a_trivially_learnable_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_jsonl(
        tmp_path / "same.jsonl", [chat(f"Question {i}?", "The answer is always forty two.") for i in range(8)]
    )
    # Full fine-tuning: a frozen random lm_head would cap what LoRA alone can reach on a random model.
    cfg = make_config(
        tmp_path,
        tiny_model_dir,
        data,
        adapter="none",
        learning_rate=0.02,
        lr_scheduler="constant",
        micro_batch_size=4,
        max_steps=20,
    )
    result = train(cfg, echo=quiet)
    losses = [r["loss"] for r in read_metrics(result.output_dir)[0]]
    assert len(losses) == 20
    assert losses[0] > 9.0  # random init: about ln(32768) = 10.4
    assert sum(losses[-5:]) / 5 < 2.0, losses
    assert result.final_train_loss == losses[-1]
    # full fine-tuning writes the whole model, not an adapter
    assert result.adapter_dir is None and result.model_dir == result.output_dir / "model"
    assert (result.model_dir / "model.safetensors").is_file() and (result.model_dir / "tokenizer.model.v3").is_file()
    assert not (result.output_dir / "adapter").exists()


# ---------------------------------------------------------------------- gradient accumulation


def _short_and_long(tok) -> list[Sample]:
    short = chat("Say hi.", "hi")
    long = chat(
        "Tell a story.",
        "Once upon a time a small fox lived in a large forest with tall trees, "
        "wide rivers and many other animals who were all its friends.",
    )
    return [Sample.from_ids(*tok.encode_chat(c["messages"])) for c in (short, long)]


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_gradient_equals_the_gradient_of_one_batch(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(None, tiny_model_dir)
    samples = _short_and_long(tok)
    assert samples[1].n_trained > 8 * samples[0].n_trained  # very different trained-token counts
    model, _ = load_model(str(tiny_model_dir))
    apply_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    with torch.no_grad():  # B starts at zero; make it non-zero so lora_A gets a gradient too
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.train()
    rt = Runtime(torch.device("cpu"), None)

    micro = [collate(samples, [[0]]), collate(samples, [[1]])]
    window = accumulate_gradients(model, micro, rt)
    loss_sum, n_tokens, n_real = window.loss_sum, window.n_tokens, window.n_real
    accumulated = _lora_grads(model)
    assert n_tokens == samples[0].n_trained + samples[1].n_trained
    assert n_real == len(samples[0]) + len(samples[1])
    model.zero_grad(set_to_none=True)

    one_batch = collate(samples, [[0], [1]])  # both rows, the short one padded
    window_1 = accumulate_gradients(model, [one_batch], rt)
    loss_sum_1, n_tokens_1 = window_1.loss_sum, window_1.n_tokens
    together = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    assert n_tokens_1 == n_tokens
    assert loss_sum == pytest.approx(loss_sum_1, rel=1e-5)

    # what a mean of per-micro-batch means would give: the test data must tell the two apart
    for b in micro:
        (model.token_loss(b) / b.n_trained / len(micro)).backward()
    mean_of_means = _lora_grads(model)

    assert accumulated.keys() == together.keys() and len(accumulated) == 14
    for name in accumulated:
        assert accumulated[name].abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], together[name], rtol=1e-4, atol=1e-7, msg=name)
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])
    gap = (flat(mean_of_means) - flat(together)).norm() / flat(together).norm()
    assert gap > 0.1


def _one_step_adapter(tmp_path: Path, model_dir: Path, data: Path, name: str, **settings):
    # lr 1 and adam_epsilon 1: the first AdamW update is g / (|g| + 1) per element, which is
    # one-to-one in g, so equal adapters after one step mean equal gradients. No clipping.
    cfg = make_config(
        tmp_path,
        model_dir,
        data,
        name=name,
        sample_packing=False,
        max_steps=1,
        learning_rate=1.0,
        adam_epsilon=1.0,
        max_grad_norm=0,
        lr_scheduler="constant",
        **settings,
    )
    result = train(cfg, echo=quiet)
    return load_file(str(result.adapter_dir / "adapter_model.safetensors")), read_metrics(result.output_dir)[0][0]


def test_gradient_accumulation_through_the_training_loop(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    tok = load_tokenizer(None, tiny_model_dir)
    records = [
        chat("Say hi.", "hi"),
        chat(
            "Tell a story.",
            "Once upon a time a small fox lived in a large forest with tall trees, wide rivers and many other animals.",
        ),
    ]
    data = write_jsonl(tmp_path / "two.jsonl", records)
    counts = [Sample.from_ids(*tok.encode_chat(r["messages"])).n_trained for r in records]
    assert counts[1] > 8 * counts[0]

    accumulated, m_acc = _one_step_adapter(
        tmp_path, tiny_model_dir, data, "acc", micro_batch_size=1, gradient_accumulation_steps=2
    )
    together, m_one = _one_step_adapter(
        tmp_path, tiny_model_dir, data, "one", micro_batch_size=2, gradient_accumulation_steps=1
    )
    assert m_acc["trained_tokens"] == m_one["trained_tokens"] == sum(counts)
    assert m_acc["loss"] == pytest.approx(m_one["loss"], rel=1e-5)
    assert m_acc["grad_norm"] == pytest.approx(m_one["grad_norm"], rel=1e-4)
    assert accumulated.keys() == together.keys()
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], together[key], rtol=1e-4, atol=1e-7, msg=key)

    # The same comparison notices a loop that averages per micro-batch instead.
    def mean_of_means(model, batches, rt):
        loss_sum = 0.0
        for b in batches:
            loss = model.token_loss(b)
            (loss / b.n_trained / len(batches)).backward()
            loss_sum += float(loss.detach())
        return loop.WindowLoss(loss_sum, sum(b.n_trained for b in batches), sum(b.n_real for b in batches), None)

    monkeypatch.setattr(loop, "accumulate_gradients", mean_of_means)
    wrong, _ = _one_step_adapter(
        tmp_path, tiny_model_dir, data, "wrong", micro_batch_size=1, gradient_accumulation_steps=2
    )
    assert any(not torch.allclose(wrong[k], together[k], rtol=1e-3, atol=1e-6) for k in together)


# ---------------------------------------------------------------------- learning-rate schedule


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # warmup 2 of 10 steps: (s+1)/2 during warm-up, then progress p = (s-2)/8
        ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 9: 1.0}),
        ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.5, 9: 0.125}),
        (
            "cosine",
            {
                0: 0.5,
                1: 1.0,
                2: 1.0,
                4: 0.5 * (1 + math.cos(math.pi / 4)),
                6: 0.5,
                9: 0.5 * (1 + math.cos(7 * math.pi / 8)),
            },
        ),
    ],
)
def test_lr_factor_at_known_steps(kind: str, expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert lr_factor(step, 10, 2, kind) == pytest.approx(value), step


def test_lr_factor_without_warmup_starts_at_peak_and_decays_monotonically() -> None:
    for kind in ("cosine", "linear"):
        values = [lr_factor(s, 20, 0, kind) for s in range(20)]
        assert values[0] == 1.0
        assert all(a > b for a, b in itertools.pairwise(values))
        assert values[-1] > 0  # the last step still learns


def test_warmup_steps_from_config() -> None:
    def cfg(**kw):
        return config_from_dict({"base_model": "m", "datasets": [{"path": "x"}], **kw})

    assert warmup_steps(cfg(), 100) == 0
    assert warmup_steps(cfg(warmup_steps=10), 100) == 10
    assert warmup_steps(cfg(warmup_steps=500), 100) == 100  # never longer than the run
    assert warmup_steps(cfg(warmup_ratio=0.25), 100) == 25
    assert warmup_steps(cfg(warmup_ratio=0.25), 10) == 2


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_logged_lr_follows_the_schedule(tmp_path: Path, tiny_model_dir: Path, color_data: Path, kind: str) -> None:
    cfg = make_config(
        tmp_path,
        tiny_model_dir,
        color_data,
        learning_rate=0.01,
        lr_scheduler=kind,
        warmup_steps=2,
        max_steps=6,
        micro_batch_size=2,
    )
    result = train(cfg, echo=quiet)
    logged = [r["lr"] for r in read_metrics(result.output_dir)[0]]
    decay = {
        "cosine": [0.5 * (1 + math.cos(math.pi * p / 4)) for p in range(4)],
        "linear": [1 - p / 4 for p in range(4)],
    }[kind]
    assert logged == pytest.approx([0.01 * f for f in [0.5, 1.0, *decay]])


# ---------------------------------------------------------------------- loss mask


def _trained_targets(sample: Sample) -> list[int]:
    return [t for t in sample.labels if t != IGNORE]


def test_train_on_inputs_false_trains_only_assistant_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok = load_tokenizer(None, tiny_model_dir)
    conversation = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    data = write_jsonl(tmp_path / "c.jsonl", [conversation])

    masked = build_dataset(make_config(tmp_path, tiny_model_dir, data), tok).train[0]
    targets = _trained_targets(masked)
    expected = tok.encode_text("Paris.", bos=False, eos=True) + tok.encode_text("Rome.", bos=False, eos=True)
    assert targets == expected  # both answers with their </s>, nothing else
    assert targets[-1] == tok.eos_id
    decoded = tok.decode(targets)
    assert "Paris." in decoded and "Rome." in decoded
    for prompt_text in ("Be terse", "Capital", "Italy"):
        assert prompt_text not in decoded

    everything = build_dataset(make_config(tmp_path, tiny_model_dir, data, train_on_inputs=True), tok).train[0]
    assert everything.tokens == masked.tokens  # same inputs, only the mask differs
    assert everything.n_trained == len(everything)  # every token but the leading BOS is a target
    decoded = tok.decode(_trained_targets(everything))
    for text in ("Be terse.", "Capital of France?", "Paris.", "And of Italy?", "Rome."):
        assert text in decoded
    assert set(targets) <= set(_trained_targets(everything))


def test_train_on_inputs_changes_the_trained_token_count_of_the_run(
    tmp_path: Path, tiny_model_dir: Path, color_data: Path
) -> None:
    counts = {}
    for flag in (False, True):
        cfg = make_config(
            tmp_path,
            tiny_model_dir,
            color_data,
            name=f"run-{flag}",
            train_on_inputs=flag,
            max_steps=1,
            micro_batch_size=8,
        )
        result = train(cfg, echo=quiet)
        report = json.loads((result.output_dir / "data_report.json").read_text())
        counts[flag] = read_metrics(result.output_dir)[0][0]["trained_tokens"]
        assert counts[flag] == report["trained_tokens"]  # one step covers all eight samples
        if flag:
            assert report["trained_tokens"] == report["tokens"]
    assert counts[True] > 2 * counts[False]


# ---------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_runs(tmp_path: Path, tiny_model_dir: Path, color_data: Path) -> None:
    def run(name: str, seed: int):
        cfg = make_config(
            tmp_path,
            tiny_model_dir,
            color_data,
            name=name,
            seed=seed,
            lora_dropout=0.1,
            learning_rate=0.02,
            micro_batch_size=1,
            gradient_accumulation_steps=2,
            max_steps=6,
        )
        result = train(cfg, echo=quiet)
        records = read_metrics(result.output_dir)[0]
        return (
            [(r["loss"], r["grad_norm"]) for r in records],
            load_file(str(result.adapter_dir / "adapter_model.safetensors")),
        )

    first, first_adapter = run("a", 3)
    second, second_adapter = run("b", 3)
    other, _ = run("c", 4)
    assert first == second  # bit-identical losses and gradient norms
    assert all(torch.equal(first_adapter[k], second_adapter[k]) for k in first_adapter)
    assert [loss for loss, _ in other] != [loss for loss, _ in first]  # the seed does matter


def test_overwrite_never_deletes_the_runs_own_inputs(tiny_model_dir, tmp_path):
    """overwrite_output_dir replaces a run of ours; one that holds the dataset must be refused, not wiped."""
    from mistral_tune.config import config_from_dict
    from mistral_tune.errors import OutputError
    from mistral_tune.fsutil import mark_output
    from mistral_tune.train.loop import check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    mark_output(run, "run")
    data = run / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = config_from_dict({"base_model": str(tiny_model_dir), "datasets": [{"path": str(data)}],
                            "output_dir": str(run), "overwrite_output_dir": True})
    with pytest.raises(OutputError, match="contains the input"):
        check_output_dir(cfg)
    assert data.is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "old.txt").write_text("x")
    mark_output(other, "run")
    assert check_output_dir(cfg.model_copy(update={"output_dir": str(other)})) == other  # a run of ours is fine


# ---------------------------------------------------------------------- metrics lines


def test_logged_loss_is_the_token_weighted_mean_of_its_window(tmp_path: Path, tiny_model_dir: Path) -> None:
    """logging_steps: 4 writes, at steps 4 and 6, the token-weighted mean loss and the mean gradient
    norm of the steps since the previous line, as the same run logging every step shows them; the
    printed line (no TTY here) carries the gradient norm, the elapsed time and an ETA."""
    story = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    records = [chat(f"Q{i}?", " ".join(story.split()[: 1 + 3 * i])) for i in range(6)]
    data = write_jsonl(tmp_path / "varied.jsonl", records)
    settings = dict(sample_packing=False, micro_batch_size=1, max_steps=6, learning_rate=1e-2, seed=5)
    every = read_metrics(train(make_config(tmp_path, tiny_model_dir, data, "every", **settings), echo=quiet)
                         .output_dir)[0]
    echoed: list[str] = []
    windows = read_metrics(train(make_config(tmp_path, tiny_model_dir, data, "window", logging_steps=4, **settings),
                                 echo=echoed.append).output_dir)[0]
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in windows] == [4, 6]
    assert len({r["trained_tokens"] for r in every}) > 1  # the weights matter
    for line, steps in zip(windows, ([1, 2, 3, 4], [5, 6]), strict=True):
        part = [r for r in every if r["step"] in steps]
        tokens = sum(r["trained_tokens"] for r in part)
        assert line["trained_tokens"] == tokens and line["window_steps"] == len(steps)
        assert line["loss"] == pytest.approx(sum(r["loss"] * r["trained_tokens"] for r in part) / tokens, rel=1e-12)
        assert line["grad_norm"] == pytest.approx(sum(r["grad_norm"] for r in part) / len(part), rel=1e-12)
        assert line["loss"] != pytest.approx(part[-1]["loss"], rel=1e-6)  # not the last step's alone
    step_lines = [e for e in echoed if e.startswith("step ")]
    assert [e.split()[1] for e in step_lines] == ["4/6", "6/6"]
    assert all("grad norm" in e and "elapsed 0:00:" in e and " eta " in e for e in step_lines)
    assert "eta ?" not in step_lines[-1]


def test_mfu_of_several_processes_is_per_gpu():
    """The step line's tokens_per_s counts every process's tokens; its MFU divides by every process's
    GPU, not one: two GPUs running at one GPU's rate each show that one GPU's MFU."""
    from mistral_tune.train.loop import step_record

    recent = [(0.5, 1000), (0.5, 1000)]  # tokens of all processes: 2,000 a second
    for world in (1, 2, 4):
        rt = Runtime(torch.device("cpu"), None, 0, world)
        record = step_record(3, 1, 1.0, 1e-4, 0.5, 100, recent, 0.5, rt, flops_tok=6e9, peak_flops=1e15)
        assert record["tokens_per_s"] == pytest.approx(2000)
        assert record["mfu"] == pytest.approx(2000 * 6e9 / 1e15 / world)
