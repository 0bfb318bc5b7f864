"""The whole path config -> samples: length policies, splits, mixing, the cache, workers, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from data_helpers import chat, write_jsonl

from mistral_tune.chat import ChatTokenizer
from mistral_tune.cli import main
from mistral_tune.data.build import build_dataset
from mistral_tune.data.pack import IGNORE, pack_rows
from mistral_tune.errors import DataError


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_too_long_drop_and_truncate(tmp_path: Path, tok, make_cfg) -> None:
    long = {"messages": [{"role": "user", "content": "start " + words(20)},
                         {"role": "assistant", "content": "first answer"},
                         {"role": "user", "content": "more"},
                         {"role": "assistant", "content": words(300, "a")}]}
    prompt_too_long = chat(words(300, "p"), "ok")
    p = write_jsonl(tmp_path / "d.jsonl", [chat("hi", "hello"), long, prompt_too_long])

    r = build_dataset(make_cfg([p]), tok).report  # default: drop, counted
    assert (r.samples, r.dropped_too_long, r.truncated) == (1, 2, 0)
    assert "dropped 2 conversation(s) longer than sequence_len" in r.lines()

    data = build_dataset(make_cfg([p], on_too_long="truncate"), tok)
    r = data.report
    assert (r.samples, r.dropped_too_long, r.truncated) == (2, 1, 1)
    full_ids, full_mask = tok.encode_chat(long["messages"])
    ids, mask = data.train.ids_and_mask(1)
    assert len(ids) - 1 <= 128 and list(ids) == full_ids[:len(ids)]  # the start is kept
    assert mask[-1] and sum(mask[len(tok.encode_chat(long["messages"][:2])[0]):]) > 0  # ends inside the last answer
    rejects = [json.loads(x) for x in Path(r.rejects_files[0]).read_text().splitlines()]
    assert rejects == [{"origin": f"{p}:3", "kind": "too_long",
                        "reason": "the prompt alone is longer than sequence_len 128"}]


def test_long_text_is_chunked_without_losing_a_token(tmp_path: Path, tok, make_cfg) -> None:
    text = words(20000) + " ünïcödé 😀 end"  # one very long line (~100k characters)
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    data = build_dataset(make_cfg([p], cleaning={"redact_pii": False}), tok)
    ids = tok.encode_text(text)
    samples = list(data.train)
    assert all(len(s) <= 128 for s in samples)
    assert data.report.text_chunks == len(samples) - 1
    # Every token after the first is a target exactly once, in order.
    targets = [t for s in samples for t in s.labels if t != IGNORE]
    assert targets == ids[1:]
    assert data.report.tokens == len(ids) - 1 and data.report.trained_tokens == len(ids) - 1
    # A window's first id is only an input (BOS, or the previous window's last target).
    assert all(data.train.ids_and_mask(k)[1][0] == 0 for k in range(len(samples)))


class SpyTokenizer(ChatTokenizer):
    """The real tokenizer, noting the most characters of text it was given at once."""

    most_chars = 0

    def encode_chat(self, messages, train_on_inputs=False, tools=None, **options):
        chars = sum(len(m.get("content") or "") for m in messages)
        SpyTokenizer.most_chars = max(SpyTokenizer.most_chars, chars)
        return super().encode_chat(messages, train_on_inputs, tools, **options)

    def encode_text(self, text, bos=True, eos=True):
        SpyTokenizer.most_chars = max(SpyTokenizer.most_chars, len(text))
        return super().encode_text(text, bos, eos)


def test_a_huge_conversation_is_dropped_or_cut_before_tokenizing(tmp_path: Path, tok, make_cfg) -> None:
    spy = SpyTokenizer(tok.source_file)
    huge = chat("summarise: " + "lorem ipsum dolor " * 200_000, "ok")  # 3.6 M characters on one line
    long_answer = {"messages": [{"role": "user", "content": "tell me"},
                                {"role": "assistant", "content": words(20_000, "a")}]}  # ~130k characters
    p = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), huge, long_answer])
    SpyTokenizer.most_chars = 0
    data = build_dataset(make_cfg([p]), spy)
    assert data.report.dropped_too_long == 2 and SpyTokenizer.most_chars < 50_000  # neither was tokenized
    rejects = {x["origin"]: x["reason"] for x in data.entries[0].rejects()}
    assert rejects[f"{p}:2"].startswith("3600013 characters of text: more than sequence_len 128 tokens can hold")

    # truncate: the answer is cut before tokenizing, and the sample is the one the whole record gives.
    SpyTokenizer.most_chars = 0
    data = build_dataset(make_cfg([p], on_too_long="truncate"), spy)
    assert SpyTokenizer.most_chars < 50_000 and data.report.truncated == 1 and data.report.dropped_too_long == 1
    ids, mask = data.train.ids_and_mask(1)
    full_ids, full_mask = tok.encode_chat(long_answer["messages"])
    assert list(ids) == full_ids[:len(ids)] and len(ids) == 129 and list(mask) == full_mask[:129]


@pytest.mark.parametrize("version", ["v1", "v3", "v7", "tekken"])
def test_a_long_text_tokenized_in_pieces_gives_the_ids_of_the_whole(version: str) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mistral_tune.chat import load_tokenizer
    from mistral_tune.data.build import encode_text_pieces

    t = load_tokenizer(version)
    letters = st.characters(codec="utf-8", categories=["L", "N"]).filter(str.isalnum)
    word = st.text(letters, min_size=1, max_size=8) | st.sampled_from(["the", "ünïcödé", "漢字", "42", "x1"])
    other = st.sampled_from(["😀", "e\u0301", "--", "...", "\t", "\n\n", "  ", "\r\n"])

    @settings(max_examples=40, deadline=None)
    @given(st.lists(word, min_size=1, max_size=60), st.lists(st.tuples(st.integers(0, 59), other), max_size=8),
           st.integers(20, 60))
    def check(words_, extras, piece_chars):
        # Words joined by single spaces give a place to cut in every half piece: the ids are the whole's.
        text = " ".join(words_)
        assert encode_text_pieces(t, text, piece_chars).tolist() == t.encode_text(text)
        # Anything else: pieces may be cut inside a word, the text stays the same.
        for at, extra in extras:
            words_.insert(at, extra)
        text = "".join(w + (" " if i % 3 else "") for i, w in enumerate(words_))
        assert t.decode(encode_text_pieces(t, text, piece_chars).tolist()) == t.decode(t.encode_text(text))

    check()


def test_a_long_text_costs_memory_by_its_ids(tmp_path: Path, tok, make_cfg, monkeypatch) -> None:
    import tracemalloc

    import mistral_tune.data.build as build

    monkeypatch.setattr(build, "TEXT_PIECE_CHARS", 20_000, raising=False)
    text = " ".join(f"w{i % 997}x" for i in range(50_000))  # 290k characters, 240k tokens
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    tracemalloc.start()
    try:
        data = build_dataset(make_cfg([p], sequence_len=2048), tok)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.report.tokens == len(tok.encode_text(text)) - 1
    # ids and mask as arrays (5 bytes a token) and the text itself, not lists of Python ints (~40 bytes a token)
    assert peak < 5 * 2**20, peak


def test_a_dataset_that_gives_no_sample_is_an_error(tmp_path: Path, tok, make_cfg) -> None:
    ok = write_jsonl(tmp_path / "ok.jsonl", [chat("q", "a")])
    long = write_jsonl(tmp_path / "long.jsonl", [chat(words(40), "fine " * 10), chat(words(60), "fine")])
    longest = len(tok.encode_chat(chat(words(60), "fine")["messages"])[0]) - 1
    with pytest.raises(DataError, match=rf"long\.jsonl: no usable sample in 2 record\(s\): 2 longer than "
                                        rf"sequence_len=16 \(the longest has {longest} tokens: sequence_len: 256 fits "
                                        r"it, or set on_too_long: truncate\)"):
        build_dataset(make_cfg([ok, long], sequence_len=16), tok)


def test_no_trained_token_refuses_to_train(tmp_path: Path, tok, make_cfg) -> None:
    zero = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    p = write_jsonl(tmp_path / "d.jsonl", [zero])
    with pytest.raises(DataError, match="no usable sample in 1 record.*no assistant tokens to train on"):
        build_dataset(make_cfg([p]), tok)
    p2 = write_jsonl(tmp_path / "e.jsonl", [zero, chat("q", "b")])
    r = build_dataset(make_cfg([p2]), tok).report
    assert r.dropped_no_trained_tokens == 1
    assert any(line.startswith("warning: dropped 1 sample(s) with no trained token") for line in r.lines())
    # Records without an assistant turn at all are bad records; skipped, they explain the refusal.
    p3 = write_jsonl(tmp_path / "f.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"1 bad record\(s\) skipped .*last message must be from the assistant"):
        build_dataset(make_cfg([p3], on_bad_record="skip"), tok)


def test_validation_split_and_val_datasets(tmp_path: Path, tok, make_cfg) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    data = build_dataset(make_cfg([a], val_set_size=0.25), tok)
    assert (len(data.train), len(data.val)) == (15, 5)
    train_ids = {tuple(s.tokens) for s in data.train}
    assert not train_ids & {tuple(s.tokens) for s in data.val}

    v = write_jsonl(tmp_path / "v.jsonl", [chat("q3", "a3"), chat("held", "out"), chat("held2", "out2")])
    data = build_dataset(make_cfg([a], val_datasets=[{"path": str(v)}]), tok)
    assert (len(data.train), len(data.val)) == (20, 2)
    assert data.report.val_overlap_removed == 1  # q3/a3 is also a training record


def test_mixing_weights_and_counts(tmp_path: Path, tok, make_cfg) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}", "y") for i in range(10)])
    c = write_jsonl(tmp_path / "c.jsonl", [chat(f"c{i}", "z") for i in range(4)])
    data = build_dataset(make_cfg([{"path": str(a), "weight": 2.5}, {"path": str(b), "weight": 0.3},
                                   {"path": str(c), "num_samples": 6}]), tok)
    assert len(data.train) == 25 + 3 + 6
    assert list(data.report.mixed.values()) == [25, 3, 6]
    origins = [data.entries[p].origins()[i].rsplit("/", 1)[1].split(":")[0]
               for p, i in zip(data.train.part, data.train.local, strict=True)]
    assert origins.count("a.jsonl") == 25 and origins.count("c.jsonl") == 6
    with pytest.raises(Exception, match="weight or num_samples"):
        make_cfg([{"path": str(a), "weight": 2, "num_samples": 3}])


def test_exact_duplicates_across_datasets_are_listed(tmp_path: Path, tok, make_cfg) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [chat("same", "answer"), chat("x", "y")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("same", "answer"), chat("same\u0000", "answer"),  # NUL stripped
                                           chat("own", "one")])
    r = build_dataset(make_cfg([a, b]), tok).report
    assert (r.samples, r.dedup_exact, r.records_used) == (3, 2, 3)
    (dups,) = [f for f in r.rejects_files if "duplicates-" in f]
    rows = [json.loads(line) for line in Path(dups).read_text().splitlines()]
    assert [(x["origin"], x["reason"]) for x in rows] == [
        (f"{b}:1", f"exact duplicate of {a}:1"), (f"{b}:2", f"exact duplicate of {a}:1")]
    assert "records: 5 read = 3 used + 2 exact duplicates" in r.accounting()
    # A dataset left with nothing is an error, not a quiet part of the mix.
    with pytest.raises(DataError, match=r"b\.jsonl: all its samples are exact duplicates .* cleaning\.dedup: false"):
        build_dataset(make_cfg([a, write_jsonl(b, [chat("x", "y")])]), tok)


class CountingTokenizer(ChatTokenizer):
    """The real tokenizer, counting how often it encodes (to see that the cache skips it)."""

    calls = 0

    def encode_chat(self, messages, train_on_inputs=False, tools=None, **options):
        CountingTokenizer.calls += 1
        return super().encode_chat(messages, train_on_inputs, tools, **options)


def test_cache_reuse_corruption_and_invalidation(tmp_path: Path, tok, make_cfg) -> None:
    counting = CountingTokenizer(tok.source_file)
    p = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(30)])
    cfg = make_cfg([p])
    first = build_dataset(cfg, counting)
    assert CountingTokenizer.calls == 30 and first.report.cache == {str(p): "built"}
    second = build_dataset(cfg, counting)
    assert CountingTokenizer.calls == 30 and second.report.cache == {str(p): "reused"}
    assert [s.tokens for s in second.train] == [s.tokens for s in first.train]

    # Flip one byte in the cached token ids: detected, rebuilt, same samples.
    tokens = second.entries[0].path / "tokens.bin"
    raw = bytearray(tokens.read_bytes())
    raw[5] ^= 0xFF
    tokens.write_bytes(bytes(raw))
    third = build_dataset(cfg, counting)
    assert CountingTokenizer.calls == 60 and third.report.cache[str(p)].startswith("rebuilt: corrupt")
    assert [s.labels for s in third.train] == [s.labels for s in first.train]

    # A setting that changes the samples, or an edited file, is a new key.
    build_dataset(make_cfg([p], train_on_inputs=True), counting)
    assert CountingTokenizer.calls == 90
    write_jsonl(p, [chat(f"q{i}", f"a{i}") for i in range(31)])
    assert build_dataset(cfg, counting).report.cache == {str(p): "built"}

    # dataset_cache: false builds every time and leaves no cache behind (only the rejects).
    build_dataset(make_cfg([p], dataset_cache=False, dataset_cache_dir=str(tmp_path / "nocache")), counting)
    assert not (tmp_path / "nocache").exists()


def test_workers_give_the_same_samples(tmp_path: Path, tok, make_cfg) -> None:
    records = [chat(f"question {i} " + words(i % 37), f"answer {i}") for i in range(1300)]
    records[700] = "{broken"
    p = write_jsonl(tmp_path / "d.jsonl", records)
    one = build_dataset(make_cfg([p], on_bad_record="skip", dataset_cache=False), tok)
    two = build_dataset(make_cfg([p], on_bad_record="skip", dataset_num_workers=2, dataset_cache=False), tok)
    assert len(one.train) == len(two.train) == 1299
    assert np.array_equal(one.train.lengths, two.train.lengths)
    assert [s.labels for s in one.train[::97]] == [s.labels for s in two.train[::97]]
    assert one.report.bad_examples == two.report.bad_examples == [f"{p}:701: not valid JSON (Expecting property "
                                                                  "name enclosed in double quotes, column 2)"]


def test_packing_fills_97_percent_on_mixed_lengths() -> None:
    rng = np.random.default_rng(0)
    # Chat-like mix: many short samples, a long tail up to 4,000 tokens.
    lengths = np.clip(rng.lognormal(mean=6.0, sigma=1.0, size=5000), 20, 4000).astype(int).tolist()
    rows = pack_rows(lengths, 4096)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 4096 for r in rows)
    fill = sum(lengths) / (len(rows) * 4096)
    assert fill >= 0.97, fill


def test_cli_data_validate_and_inspect(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [chat("What is 2+2?", "It is 4."), chat("And 3+3?", "Six.")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("q", "a"), "not json", {"messages": []}])
    config = tmp_path / "c.yaml"
    common = f"base_model: unused\ntokenizer: v3\nsequence_len: 64\ndataset_cache_dir: {tmp_path / 'cache'}\n"
    config.write_text(common + f"datasets:\n  - path: {good}\n")
    assert main(["data", "validate", str(config)]) == 0
    assert "data OK" in capsys.readouterr().out

    config.write_text(common + f"datasets:\n  - path: {bad}\n")
    assert main(["data", "validate", str(config)]) != 0
    captured = capsys.readouterr()
    assert f"{bad}:2: not valid JSON" in captured.out and f"{bad}:3: field 'messages'" in captured.out
    assert "2 bad record(s)" in captured.err

    config.write_text(common + f"datasets:\n  - path: {good}\n")
    out_dir = tmp_path / "inspect"
    assert main(["data", "inspect", str(config), "-n", "2", "--out", str(out_dir), "--color", "never"]) == 0
    text = capsys.readouterr().out
    assert "« It is 4.</s>»" in text  # the answer is trained, marked; the prompt is not
    assert "[INST] What is 2+2?[/INST]" in text and "«[INST]" not in text
    assert "trained tokens:" in text and "== sample lengths" in text
    page = (out_dir / "samples.html").read_text()
    assert "<span class='t'> It is 4.&lt;/s&gt;</span>" in page
    assert (out_dir / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["data", "inspect", str(config), "-n", "1", "--out", "", "--color", "always"]) == 0
    assert re.search(r"\x1b\[2m<s>\[INST\] [^\x1b]+\[/INST\]\x1b\[0m\x1b\[32m (It is 4\.|Six\.)</s>\x1b\[0m",
                     capsys.readouterr().out)


def test_group_by_length_batches_similar_rows() -> None:
    from mistral_tune.data.pack import group_rows

    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 1000, size=512).tolist()
    rows = [[i] for i in range(len(lengths))]
    padded = {}
    for name, by_len in (("random", None), ("grouped", lengths)):
        batches = group_rows(rows, 8, shuffle_seed=3, row_lengths=by_len)
        assert sorted(r[0] for b in batches for r in b) == list(range(512))  # every row once
        padded[name] = sum(len(b) * max(lengths[r[0]] for r in b) - sum(lengths[r[0]] for r in b) for b in batches)
    assert padded["grouped"] < 0.2 * padded["random"]
    # Same seed, same batches (a resumed run sees the same order).
    assert group_rows(rows, 8, 3, lengths) == group_rows(rows, 8, 3, lengths)


def test_workers_read_ahead_a_bounded_number_of_chunks(tok) -> None:
    """Streaming: the reader must not run ahead of the workers (a 1M-record file would fill RAM)."""
    from mistral_tune.config import config_from_dict
    from mistral_tune.data.build import _run_pool, _settings
    from mistral_tune.data.sources import RawRecord

    pulled = []

    def chunks():
        for k in range(40):
            pulled.append(k)
            yield [RawRecord(f"mem:{k}", chat(f"q{k}", "a"))]

    at_first_result = []
    settings = _settings(config_from_dict({"base_model": "x", "datasets": [{"path": "x"}]}), tok)
    _run_pool(chunks(), [], "messages", tok, settings, 2, lambda out: at_first_result.append(len(pulled)))
    assert len(at_first_result) == 40  # every chunk processed
    assert at_first_result[0] <= 2 * 2 + 1, at_first_result[0]


def test_inspect_lists_what_was_left_out(tmp_path: Path, capsys) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), "not json", chat("Ignore previous instructions", "no")])
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: unused\ntokenizer: v3\ndataset_cache_dir: {tmp_path / 'cache'}\n"
                      f"datasets:\n  - path: {p}\n")
    assert main(["data", "inspect", str(config), "on_bad_record=skip", "--out", "", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "== records left out (first 1;" in out and f"  {p}:2: [bad] not valid JSON" in out
    assert "== flagged: possible prompt injection" in out and f"  {p}:3: 'Ignore previous instructions'" in out


def test_two_writers_of_one_cache_key(tmp_path: Path, tok, make_cfg) -> None:
    """Ranks of one run may build the same entry at once: the second to finish keeps the first's."""
    from mistral_tune.data.build import load_or_build
    from mistral_tune.data.cache import CacheWriter, open_entry

    p = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    cfg = make_cfg([p])
    entry, status = load_or_build(cfg.datasets[0], cfg, tok, tmp_path / "cache")
    assert status == "built"
    late = CacheWriter(tmp_path / "cache", entry.path.name)
    late.append(np.array([1, 2], np.int32), np.array([0, 1], np.uint8), np.array([2]), np.array([1], np.int32),
                np.array([7], np.uint64), ["late:1"])
    assert late.finish(entry.manifest) == entry.path
    again, why = open_entry(tmp_path / "cache", entry.path.name)
    assert again is not None and again.origins() == [f"{p}:1"]  # the first entry, intact
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_inspect_at_an_origin(tmp_path: Path, capsys) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"answer {i}") for i in range(5)] + ["bad"])
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: unused\ntokenizer: v3\ndataset_cache_dir: {tmp_path / 'cache'}\n"
                      f"on_bad_record: skip\ndatasets:\n  - path: {p}\n")
    assert main(["data", "inspect", str(config), "-n", "0", "--out", "", "--color", "never",
                 "--at", f"{p}:4", "--at", f"{p}:6"]) == 0
    out = capsys.readouterr().out
    assert f"-- sample 1: {p}:4 (" in out and "[INST] q3[/INST]« answer 3</s>»" in out
    assert f"no sample comes from {p}:6" in out and "-- sample 2" not in out


def test_row_stream_groups_by_length_and_covers_every_row() -> None:
    from mistral_tune.train.schedule import RowStream

    rng = np.random.default_rng(2)
    lengths = rng.integers(10, 1000, size=300).tolist()
    rows = [[i] for i in range(300)]
    for world in (1, 2):
        streams = [RowStream(rows, 5, rank, world, lengths, group_size=4) for rank in range(world)]
        batches = []  # in the order they are cut: a round of `world`, rank by rank
        while len(batches) < 75:  # one epoch: 300 rows in micro-batches of 4 (a round may run into the next)
            for s in streams:
                batches.append(s.next(4)[1])
        batches = batches[:75]
        seen = sorted(r[0] for b in batches for r in b)
        assert seen == list(range(300))  # each row once per epoch, across ranks
        spread = np.mean([max(lengths[r[0]] for r in b) - min(lengths[r[0]] for r in b) for b in batches if b])
        assert spread < 100  # random batches of 4 from 10..1000 spread ~ 500
    assert RowStream(rows, 5, row_lengths=lengths, group_size=4).order(0) != RowStream(rows, 5).order(0)


LOCKED_TOKENIZER = '''
import threading

LOCK = threading.Lock()  # stands for any lock a library's thread may hold when the workers start


class LockedTokenizer:
    """A tokenizer that takes LOCK on every use, as a library guarding its state would."""

    def __init__(self, inner):
        self.inner = inner

    def __getstate__(self):
        return {"inner": self.inner}

    def __setstate__(self, state):
        self.inner = state["inner"]

    def __getattr__(self, name):
        with LOCK:
            return getattr(self.inner, name)
'''

HOLD_AND_BUILD = '''
import sys, threading, time
sys.path[:0] = [{tmp!r}, {tests!r}]
from data_helpers import chat
from locked_tokenizer import LOCK, LockedTokenizer
from mistral_tune.chat import load_tokenizer
from mistral_tune.config import config_from_dict
from mistral_tune.data.build import _run_pool, _settings
from mistral_tune.data.sources import RawRecord

tok = load_tokenizer("v3")
settings = _settings(config_from_dict({{"base_model": "x", "datasets": [{{"path": "x"}}]}}), tok)
held, release = threading.Event(), threading.Event()
def hold():
    with LOCK:
        held.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
chunks = [[RawRecord(f"mem:{{k}}", chat(f"q{{k}}", "a"))] for k in range(6)]
out = []
timer = threading.Timer(2.0, release.set)  # the other thread lets go soon after the workers start
timer.start()
_run_pool(iter(chunks), [], "messages", LockedTokenizer(tok), settings, 2, out.append)
print("built", len(out))
'''


def test_workers_do_not_inherit_a_lock_another_thread_holds(tmp_path: Path) -> None:
    """Workers forked from a process whose other thread held a lock (torch's, a tokenizer's, a
    compiler's) inherited it held, by a thread that does not exist in the child, and waited forever:
    data builds hung on a futex after a compiled training step. Workers must start clean."""
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "locked_tokenizer.py").write_text(LOCKED_TOKENIZER)
    script = HOLD_AND_BUILD.format(tmp=str(tmp_path), tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers too
        proc.communicate()
        pytest.fail("the data build's workers hung on a lock inherited from the parent's other thread")
    assert proc.returncode == 0, out
    assert "built 6" in out
