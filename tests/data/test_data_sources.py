"""Reading records from each kind of source, with origins a user can open in an editor."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from data_helpers import chat, write_jsonl

from mistral_tune.data.build import build_dataset
from mistral_tune.data.sources import Source, read_source, resolve_sources
from mistral_tune.errors import DataError

RECORDS = [chat(f"question {i}", f"answer {i}") for i in range(5)]


def _read(path: Path, kind: str | None = None) -> list:
    (src,) = resolve_sources(str(path), kind or "auto")
    return [r for r in read_source(src) if not r.blank]


def test_jsonl_origins_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        json.dumps(RECORDS[0]).encode() + b"\n\n"  # a blank line is not a record
        + b"{not json\n"
        + b"[1, 2]\n"
        + b'{"messages": "caf\xe9"}\n'  # Latin-1 byte: not UTF-8
        + json.dumps(RECORDS[1]).encode() + b"\n"
    )
    raws = _read(p)
    assert [r.origin for r in raws] == [f"{p}:{n}" for n in (1, 3, 4, 5, 6)]
    assert raws[0].record == RECORDS[0] and raws[0].error is None
    assert "not valid JSON" in raws[1].error
    assert "expected a JSON object, got an array" in raws[2].error
    assert "not valid UTF-8" in raws[3].error
    assert raws[4].record == RECORDS[1]
    assert [r.origin for r in read_source(Source("jsonl", str(p))) if r.blank] == [f"{p}:2"]  # counted


def test_json_array_gives_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in RECORDS[:2]) + ",\n 7\n]\n")
    raws = _read(p)
    assert [r.record for r in raws[:2]] == RECORDS[:2]
    first_len = json.dumps(RECORDS[0], indent=1).count("\n") + 1
    assert raws[0].origin == f"{p}:2 (record 0)"
    assert raws[1].origin == f"{p}:{2 + first_len} (record 1)"
    assert "got a number" in raws[2].error
    # A compact array: one line, told apart by the record index.
    p.write_text(json.dumps(RECORDS[:3], separators=(",", ":")))
    assert [r.origin for r in _read(p)] == [f"{p}:1 (record {i})" for i in range(3)]


def test_json_array_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text('[\n{"text": "a"},\n{"text": "b",,},\n{"text": "c"}\n]')
    raws = _read(p)  # an element whose brackets close is one bad record; the others are read
    assert [r.origin for r in raws] == [f"{p}:{n} (record {n - 2})" for n in (2, 3, 4)]
    assert raws[1].error.startswith("not valid JSON") and raws[2].record == {"text": "c"}
    p.write_text('[\n{"text": "a"},\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"d\.json:4: not valid JSON.*the rest of the array cannot be read"):
        _read(p)


def test_parquet_and_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    raws = _read(tmp_path / "d.parquet")
    assert [r.record for r in raws] == rows
    assert raws[2].origin.endswith("d.parquet:row 2")

    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages", "note"])
        w.writerow([json.dumps(RECORDS[0]["messages"]), "multi\nline"])  # a quoted newline spans lines
        w.writerow([json.dumps(RECORDS[1]["messages"]), "x"])
        w.writerow(["a", "b", "c"])
    raws = _read(tmp_path / "d.csv")
    assert raws[0].record["messages"] == RECORDS[0]["messages"]  # the JSON cell is parsed
    assert [r.origin.rsplit(":", 1)[1] for r in raws] == ["3", "4", "5"]  # line where each row ends
    assert "more field(s) than the header" in raws[2].error

    with (tmp_path / "long.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["text"], ["x" * 300_000]])  # over csv's default 128 KiB cell limit
    assert len(_read(tmp_path / "long.csv")[0].record["text"]) == 300_000


def test_glob_and_directory(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", RECORDS[2:])
    (tmp_path / "README.md").write_text("not data")
    by_dir = resolve_sources(str(tmp_path))
    assert [Path(s.path).name for s in by_dir] == ["a.jsonl", "b.jsonl"]
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "sub" / "hf"))  # not read as .json files
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps(RECORDS[0]) + "\n")
    by_dir = resolve_sources(str(tmp_path))
    assert [Path(s.path).name for s in by_dir] == ["a.jsonl", "c.jsonl.gz", "b.jsonl"]
    assert [r.record for r in read_source(by_dir[1])] == RECORDS[:1]
    by_glob = resolve_sources(str(tmp_path / "**" / "*.jsonl"))
    assert [Path(s.path).name for s in by_glob] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(DataError, match="no file matches"):
        resolve_sources(str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match="not found"):
        resolve_sources(str(tmp_path / "missing.jsonl"))


def test_empty_file_is_an_error(tmp_path: Path, tok, make_cfg) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        build_dataset(make_cfg([tmp_path / "empty.jsonl"]), tok)


def test_hf_dataset_saved_to_disk(tmp_path: Path, tok, make_cfg) -> None:
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dict"))

    (src,) = resolve_sources(str(tmp_path / "single"))
    assert src.kind == "hf_disk"
    raws = list(read_source(src))
    assert [r.record for r in raws] == rows and raws[3].origin == f"{tmp_path / 'single'}:3"

    data = build_dataset(make_cfg([{"path": str(tmp_path / "dict"), "split": "test"}]), tok)
    assert data.report.formats == {f"{tmp_path / 'dict'}[test]": "sharegpt"}
    assert len(data.train) == 2
    with pytest.raises(DataError, match=r"no split 'validation'"):
        build_dataset(make_cfg([{"path": str(tmp_path / "dict"), "split": "validation"}]), tok)


def test_hub_name_offline_fails_with_a_clear_message(tmp_path: Path, tok, make_cfg, monkeypatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # The libraries read HF_HUB_OFFLINE at import; set their flags as the env var would have.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nobody/no-such-dataset.*cannot load the Hugging Face dataset"):
        build_dataset(make_cfg([{"path": "nobody/no-such-dataset"}]), tok)


def test_source_hf_on_a_plain_folder_uses_load_dataset(tmp_path: Path, tok, make_cfg, monkeypatch) -> None:
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", RECORDS)
    data = build_dataset(make_cfg([{"path": str(tmp_path / "repo"), "source": "hf"}]), tok)
    assert len(data.train) == len(RECORDS)
    assert data.report.formats == {str(tmp_path / "repo"): "messages"}
    assert data.report.per_file == {f"{tmp_path / 'repo'}[train]": len(RECORDS)}


def test_a_mistyped_local_path_is_file_not_found_not_a_hub_name(tmp_path: Path, monkeypatch) -> None:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "alpaca.json", RECORDS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"dataset file not found: data/alpaka\.json; did you mean data/alpaca\.json\?"):
        resolve_sources("data/alpaka.json")
    with pytest.raises(DataError, match=r"not found: dat/alpaca\.json; did you mean data\?"):
        resolve_sources("dat/alpaca.json")

    part = st.text("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-", min_size=1, max_size=12)

    @settings(max_examples=100, deadline=None)
    @given(owner=part | st.just("data"), name=part,
           suffix=st.sampled_from(["", "", ".json", ".jsonl", ".jsonl.gz", ".ndjson", ".parquet", ".csv", ".JSON"]))
    def check(owner: str, name: str, suffix: str) -> None:
        path = f"{owner}/{name}{suffix}"
        assume(not Path(path).exists())
        if suffix or owner == "data":  # a data file's name, or a folder that is here: a local path
            with pytest.raises(DataError, match="dataset file not found"):
                resolve_sources(path)
        else:  # "owner/name" and nothing local by that name: a hub dataset
            (src,) = resolve_sources(path)
            assert (src.kind, src.path) == ("hf_hub", path)

    check()
