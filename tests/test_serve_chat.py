"""Generation (single, batched, cached across chat turns), the terminal chat loop and `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from export_fixtures import tiny_adapter, tiny_model
from mistral_tune.cli import main
from mistral_tune.generate.decoder import Params
from mistral_tune.generate.run import Conversation, generate_batch, stream
from mistral_tune.generate.sampling import Modes, pick
from mistral_tune.generate.text import TextStream
from mistral_tune.models.tuned import load_tuned
from mistral_tune.serve.chat import Sampling, chat_loop
from plain_decoding import plain_greedy

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two, exactly?"}],
    [{"role": "user", "content": "Tell me a long story about a dragon who learned to count to twenty"}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("serve") / "base", "v3", num_hidden_layers=2)


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load_tuned(model_dir)


def test_batched_greedy_equals_one_at_a_time(loaded) -> None:
    tok = loaded.tokenizer
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # padding is really exercised
    singles = [plain_greedy(loaded.model, p, 12, eos_id=tok.eos_id) for p in prompts]
    assert generate_batch(loaded.model, prompts, 12, eos_id=tok.eos_id) == singles
    assert [[t.id for t in stream(loaded.model, p, Params(12), tok.eos_id)] for p in prompts] == singles
    assert any(len(s) == 12 for s in singles)


@torch.no_grad()
def test_greedy_matches_transformers_generate(loaded, model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = loaded.tokenizer
    ids = tok.encode_prompt(PROMPTS[1])
    ours = generate_batch(loaded.model, [ids], 10)[0]  # no eos stop: compare 10 tokens exactly
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()


def test_sampling_is_reproducible_with_a_seed_and_top_p_restricts(loaded) -> None:
    ids = loaded.tokenizer.encode_prompt(PROMPTS[0])
    run = lambda seed, **kw: [t.id for t in stream(loaded.model, ids, Params(8, temperature=1.0, seed=seed, **kw))]
    assert run(3) == run(3) != run(4)
    greedy = plain_greedy(loaded.model, ids, 8)
    assert run(5, top_p=1e-6) == run(6, top_k=1) == greedy  # only the most likely token is kept


@settings(max_examples=200, deadline=None)
@given(rest=st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=50), where=st.integers(0, 50),
       temperature=st.sampled_from([1e-40, 1e-300, 5e-324]) | st.floats(5e-324, 1e-30),
       top_p=st.sampled_from([1e-300, 5e-324]) | st.floats(5e-324, 1e-6), seed=st.integers(0, 2**32))
def test_vanishing_temperature_or_top_p_samples_the_most_likely_token(rest, where, temperature, top_p, seed) -> None:
    top = min(where, len(rest))
    row = torch.tensor([rest[:top] + [max(rest) + 0.01] + rest[top:]])  # float32, as the model's logits
    def chosen(t: float, p: float) -> int:
        one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)
        words = torch.full((1, (row.shape[1] + 31) // 32), -1, dtype=torch.int32)
        return int(pick(row, Modes(sample=True, filter=True), one(t), one(p), one(0, torch.long),
                        one(seed, torch.long), one(0, torch.long), words).tokens[0])

    assert chosen(temperature, 1.0) == top
    assert chosen(2.0, top_p) == top


def test_cached_generator_reuses_the_conversation_prefix(loaded) -> None:
    tok = loaded.tokenizer
    session = Conversation(loaded.model)
    first = [{"role": "user", "content": "Hi"}]
    answer = [t.id for t in session.stream(tok.encode_prompt(first), Params(6))]
    assert session.cached_tokens == len(tok.encode_prompt(first)) + len(answer) - 1
    second = first + [{"role": "assistant", "content": tok.decode(answer) or "ok"},
                      {"role": "user", "content": "And then?"}]
    ids = tok.encode_prompt(second)
    fresh = plain_greedy(loaded.model, ids, 6)
    assert [t.id for t in session.stream(ids, Params(6))] == fresh


def test_text_stream_never_splits_a_character(loaded) -> None:
    tok = loaded.tokenizer
    text = "Ünïcödé 日本語 🙂 done"
    ids = tok.encode_text(text, bos=False, eos=False)
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_chat_loop_commands_history_and_formatting(loaded) -> None:
    inputs = iter(["/system Be brief.", "Hi", "  ", "/bogus", "2+2?", "/reset", "Hello again", "/exit"])
    shown: list[str] = []
    history = chat_loop(loaded, Sampling(max_tokens=5, temperature=0.0), read=lambda _: next(inputs),
                        write=shown.append)
    out = "".join(shown)
    assert "system prompt set" in out and "unknown command /bogus" in out and "conversation cleared" in out
    # After /reset only the last exchange remains, still under the system prompt.
    assert history[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in history[1:]] in (["user", "assistant"], ["user"])
    assert history[1]["content"] == "Hello again"


def test_chat_ends_on_end_of_input(loaded) -> None:
    def read(_):
        raise EOFError

    assert chat_loop(loaded, Sampling(), read=read, write=lambda s: None) == []


def test_cli_generate_writes_jsonl_in_input_order(model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "messages": PROMPTS[2]}, {"id": "b", "prompt": "Hi"},
        {"id": "c", "messages": [*PROMPTS[1], {"role": "assistant", "content": "4"}]},  # reference answer
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(model_dir), str(prompts), "--out", str(out), "--batch-size", "2",
                 "--max-tokens", "7"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    loaded = load_tuned(model_dir)
    for row, conv in zip(rows, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], strict=True):
        ids = loaded.tokenizer.encode_prompt(conv)
        want = plain_greedy(loaded.model, ids, 7, eos_id=loaded.tokenizer.eos_id)
        assert row["completion"] == loaded.tokenizer.decode(want)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (len(ids), len(want))


def test_cli_generate_reports_bad_input_lines(model_dir: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    assert main(["generate", str(model_dir), str(prompts), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["generate", str(model_dir), str(prompts), "--out", "x", "--top-p", "0"]) == 2


def test_adapter_and_run_directories_load_merged_in_memory(model_dir: Path, tmp_path: Path) -> None:
    adapter = tiny_adapter(model_dir, tmp_path / "run" / "adapter")
    from mistral_tune.export.hf import merge_to_dir

    merged = merge_to_dir(adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 3, 23325, 4]])
    a, b = load_tuned(tmp_path / "run"), load_tuned(merged)
    torch.testing.assert_close(a.model(ids), b.model(ids))
