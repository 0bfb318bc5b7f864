"""Hostile records: whatever a data file holds, the data commands raise nothing but DataError, and
every record is accounted for by file:line (read = used + rejected + duplicates; blank lines counted).

Files of .jsonl, .json (array) and .csv are generated from good records and hostile ones: integers
past Python's digit limit, arrays nested 2,000 and 100,000 deep, invalid UTF-8, lone surrogates as
JSON escapes, NUL and control characters, wrong types, blank lines, huge strings, duplicates.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import chat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_tune.cli import main
from mistral_tune.config import config_from_dict
from mistral_tune.data.build import build_dataset
from mistral_tune.errors import DataError

# ---------------------------------------------------------------------- records (JSON values as bytes)
# Each builder takes a unique tag (so that only the records meant as duplicates are duplicates) and
# returns the bytes of one JSON value on one line. The expectation says what must become of it:
# use (a sample), bad (a bad record), too_long (dropped before tokenizing).


def _j(value) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates become "\ud800" escapes


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


USE = {
    "chat": lambda t: _j(chat(f"question {t}", f"answer {t}")),
    "lone_surrogates": lambda t: _j(chat(f"half \ud800 a pair {t} \udfff", f"answer {t}")),
    "nul_and_controls": lambda t: _j(chat(f"nul\x00 esc\x1b bell\x07 {t}", f"answer\x0c {t}")),
    "mojibake": lambda t: _j(chat(f"cafÃ© {t}", f"naÃ¯ve {t}")),
    "text": lambda t: _j({"text": f"plain text {t}"}),
    "long_text": lambda t: _j({"text": f"{t} " + "word " * 40_000}),  # split into windows, none lost
    "alpaca_nan_extra": lambda t: f'{{"instruction": "do {t}", "output": "done", "score": NaN}}'.encode(),
}
BAD = {
    "huge_int": lambda t: b'{"text": "x ' + t.encode() + b'", "n": ' + b"7" * 4400 + b"}",
    "huge_negative_int": lambda t: b'{"messages": -' + b"1" * 5000 + b"}",
    "deep_2000": lambda t: b'{"text": "' + t.encode() + b'", "x": ' + _deep(2000) + b"}",
    "deep_100000": lambda t: b'{"messages": ' + _deep(100_000) + b"}",
    "deep_in_tool_args": lambda t: b'{"messages": [{"role": "user", "content": "' + t.encode() + b'"}, '
                                   b'{"role": "assistant", "tool_calls": [{"id": "abcdefghi", "type": "function", '
                                   b'"function": {"name": "f", "arguments": ' + _deep(900) + b"}}]}]}",
    "invalid_utf8_latin1": lambda t: b'{"text": "caf\xe9 ' + t.encode() + b'"}',
    "invalid_utf8_surrogate": lambda t: b'{"text": "\xed\xa0\x80 ' + t.encode() + b'"}',
    "invalid_utf8_overlong": lambda t: b'{"text": "\xc0\xaf ' + t.encode() + b'"}',
    "invalid_utf8_ff": lambda t: b'{"text": "\xff' + t.encode() + b'"}',
    "raw_nul_in_string": lambda t: b'{"text": "a\x00b ' + t.encode() + b'"}',
    "not_json": lambda t: b"{not json " + t.encode(),  # in an array: the rest is unreadable (see below)
    "balanced_syntax_error": lambda t: b'{"text": "' + t.encode() + b'",, "y": 1}',
    "array": lambda t: b"[1, 2]",
    "number": lambda t: b"42",
    "string": lambda t: b'"' + t.encode() + b'"',
    "null": lambda t: b"null",
    "messages_number": lambda t: _j({"messages": 5, "tag": t}),
    "messages_empty": lambda t: _j({"messages": [], "tag": t}),
    "message_not_object": lambda t: _j({"messages": [1, t]}),
    "role_number": lambda t: _j({"messages": [{"role": 5, "content": t}]}),
    "content_object": lambda t: _j({"messages": [{"role": "user", "content": {"a": t}},
                                                 {"role": "assistant", "content": "b"}]}),
    "text_null": lambda t: _j({"text": None, "tag": t}),
    "text_list": lambda t: _j({"text": [t]}),
    "text_blank": lambda t: _j({"text": "   \n\t ", "tag": t}),
    "weight_string": lambda t: _j({"messages": [{"role": "user", "content": t},
                                                {"role": "assistant", "content": "a", "weight": "x"}]}),
    "weight_nan": lambda t: f'{{"messages": [{{"role": "user", "content": "{t}"}}, '
                            f'{{"role": "assistant", "content": "a", "weight": NaN}}]}}'.encode(),
    "weight_inf": lambda t: f'{{"messages": [{{"role": "user", "content": "{t}"}}, '
                            f'{{"role": "assistant", "content": "a", "weight": 1e400}}]}}'.encode(),
    "tool_calls_wrong": lambda t: _j({"messages": [{"role": "user", "content": t},
                                                   {"role": "assistant", "tool_calls": [{"id": 5, "function": 7}]}]}),
    "tools_wrong": lambda t: _j({**chat(t, "a"), "tools": [{"type": "function", "function": 5}]}),
    "sharegpt_wrong": lambda t: _j({"conversations": [{"from": 1, "value": t}]}),
    "instruction_object": lambda t: _j({"instruction": {"x": t}, "output": 3}),
    "prompt_numbers": lambda t: _j({"prompt": 1, "completion": 2, "tag": t}),
    "unknown_layout": lambda t: _j({"foo": t}),
    "assistant_first": lambda t: _j({"messages": [{"role": "assistant", "content": t}]}),
}
TOO_LONG = {
    "huge_chat": lambda t: _j(chat(f"{t} " + "lorem ipsum " * 100_000, "short answer")),
}
BLANKS = [b"", b"   ", b"\t \r"]


@st.composite
def record_specs(draw, with_blanks: bool):
    """A list of (expectation, name) pairs; one unique good chat comes first so no file is empty."""
    names = [("use", "chat")]
    choices = ([("use", n) for n in USE] + [("bad", n) for n in BAD] + [("too_long", n) for n in TOO_LONG]
               + [("dup", "chat")] + ([("blank", i) for i in range(len(BLANKS))] if with_blanks else []))
    # The big builders (long_text, huge_chat, deep_100000) are one choice among ~45: a few per run.
    names += draw(st.lists(st.sampled_from(choices), max_size=14))
    return draw(st.permutations(names))


def _build(expect: str, name, tag: str, last_good: str | None) -> bytes:
    if expect == "blank":
        return BLANKS[name]
    if expect == "dup":
        return last_good
    return {"use": USE, "bad": BAD, "too_long": TOO_LONG}[expect][name](tag)


# ---------------------------------------------------------------------- files


def write_jsonl(path: Path, specs) -> dict[str, str]:
    """Writes the records a line each; returns {origin: expectation} (blank lines included)."""
    lines, expected, last = [], {}, None
    for i, (expect, name) in enumerate(specs):
        raw = _build(expect, name, f"{path.stem}-{i}", last)
        if expect == "dup" and last is None:
            expect, raw = "use", _build("use", "chat", f"{path.stem}-{i}", None)
        if (expect, name) == ("use", "chat"):
            last = raw
        lines.append(raw)
        expected[f"{path}:{i + 1}"] = expect
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def write_json_array(path: Path, specs, compact: bool) -> dict[str, str]:
    out, expected, last, line = b"[", {}, None, 1
    if not compact:
        out += b"\n"
        line += 1
    index = 0
    for i, (expect, name) in enumerate(specs):
        if expect == "blank":
            continue
        if name == "not_json":  # brackets that never close: no element after it could be found
            name = "balanced_syntax_error"
        raw = _build(expect, name, f"{path.stem}-{i}", last)
        if expect == "dup" and last is None:
            expect, raw = "use", _build("use", "chat", f"{path.stem}-{i}", None)
        if (expect, name) == ("use", "chat"):
            last = raw
        if index:
            out += b"," if compact else b",\n"
            line += 0 if compact else 1
        expected[f"{path}:{line} (record {index})"] = expect
        out += raw
        index += 1
    path.write_bytes(out + b"]\n")
    return expected


CSV_USE = {
    "row": lambda t: [f"do {t}", f"done {t}"],
    "nul_and_controls": lambda t: [f"do\x00 {t}\x1b", f"done\x07 {t}"],
    "quoted_newlines": lambda t: [f"line one\nline two {t}", f"done,\n\"quoted\" {t}"],
}
CSV_BAD = {
    "extra_field": lambda t: [f"do {t}", "done", "surplus"],
    "missing_output": lambda t: [f"do {t}"],
    "empty_output": lambda t: [f"do {t}", ""],
    "invalid_utf8": lambda t: [f"caf\udce9 {t}", "done"],  # written as the raw byte 0xE9
    "one_empty_cell": lambda t: [""],
}
CSV_TOO_LONG = {"huge_cell": lambda t: [f"do {t}", "lorem ipsum " * 50_000]}
CSV_MESSAGES_TOO_LONG = {"huge": lambda t: [json.dumps(chat(t + " lorem ipsum" * 100_000, "a")["messages"]), t]}
CSV_MESSAGES_BAD = {
    "huge_int": lambda t: ["[" + "9" * 4400 + "]", t],
    "deep": lambda t: ["[" * 100_000 + "]" * 100_000, t],
    "not_a_list": lambda t: [f"hello {t}", t],
    "broken_json": lambda t: [f'[{{"role": "user", "content": "{t}"', t],
}


def write_csv(path: Path, specs, header: list[str], use, bad, too_long) -> dict[str, str]:
    rows, kinds, last = [], [], None
    for i, (expect, _) in enumerate(specs):
        tag = f"{path.stem}-{i}"
        if expect == "blank":
            row = []
        elif expect == "dup" and last is not None:
            row = last
        else:
            if expect == "dup":
                expect = "use"
            table = list({"use": use, "bad": bad, "too_long": too_long}[expect].values())
            row = table[i % len(table)](tag)
            if expect == "use":
                last = row
        rows.append(row)
        kinds.append(expect)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    data = text.getvalue().encode("utf-8", "surrogateescape")
    path.write_bytes(data)
    # The line each row ends on, as the csv module (the reference) counts it.
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
    next(reader)
    expected = {}
    for kind, _ in zip(kinds, reader, strict=True):
        expected[f"{path}:{reader.line_num}"] = kind
    return expected


def _messages_use(t):
    return [json.dumps(chat(f"question {t}", f"answer {t}")["messages"]), t]


# ---------------------------------------------------------------------- the check


def check_accounting(cfg, tok, expected: dict[str, str]) -> Counter:
    """Build with on_bad_record: skip and check that every record is where its expectation says, and
    that the report's counts add up. Returns what was checked."""
    data = build_dataset(cfg, tok)
    r = data.report
    records = {o: e for o, e in expected.items() if e != "blank"}
    rejects: dict[str, str] = {}
    for entry in data.entries:
        for rej in entry.rejects():
            assert rej["origin"] not in rejects, f"{rej['origin']} rejected twice"
            rejects[rej["origin"]] = rej["kind"]
    dups = {}
    for f in r.rejects_files:
        if "duplicates-" in f:
            dups = {json.loads(line)["origin"]: "dup" for line in Path(f).read_text().splitlines()}
    made = {o for entry in data.entries for o in entry.origins()}
    used = made - set(dups)
    assert not (made & set(rejects)), "a record both rejected and made into a sample"
    assert set(rejects) | set(dups) | used == set(records), (
        f"unaccounted: {set(records) - set(rejects) - set(dups) - used}, "
        f"unknown: {(set(rejects) | set(dups) | used) - set(records)}")
    for origin, expect in records.items():
        got = "use" if origin in used else "dup" if origin in dups else rejects[origin]
        assert got == expect, f"{origin}: expected {expect}, got {got}"
    kinds = Counter(rejects.values())
    assert r.records == len(records) and r.blank_lines == len(expected) - len(records)
    assert r.rejected == kinds["bad"] and r.dropped_too_long == kinds["too_long"]
    assert r.dedup_exact == len(dups) and r.records_used == len(used)
    assert r.records == r.records_used + r.records_left_out
    return Counter(expected.values()) + Counter(records=len(records))


def _config_dict(paths: list[Path], cache: Path) -> dict:
    return {"tokenizer": "v3", "datasets": [{"path": str(p)} for p in paths], "sequence_len": 128,
            "dataset_cache_dir": str(cache), "dataset_num_workers": 1, "on_bad_record": "skip"}


def run_once(tok, specs, compact: bool, tallies: Counter | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        expected = write_jsonl(root / "a.jsonl", specs)
        expected |= write_json_array(root / "b.json", specs, compact)
        expected |= write_csv(root / "c.csv", specs, ["instruction", "output"], CSV_USE, CSV_BAD, CSV_TOO_LONG)
        expected |= write_csv(root / "d.csv", specs, ["messages", "note"], {"row": _messages_use}, CSV_MESSAGES_BAD,
                              CSV_MESSAGES_TOO_LONG)
        paths = [root / n for n in ("a.jsonl", "b.json", "c.csv", "d.csv")]
        settings_ = _config_dict(paths, root / "cache")
        checked = check_accounting(config_from_dict(settings_), tok, expected)
        if tallies is not None:
            tallies.update(checked)
        # on_bad_record: error stops on the bad records, with a DataError naming the first.
        bad = [o for o, e in expected.items() if e == "bad"]
        strict = config_from_dict({**settings_, "on_bad_record": "error"})
        if bad:
            with pytest.raises(DataError, match=f"{len(bad)} bad record\\(s\\): "):
                build_dataset(strict, tok)
        else:
            build_dataset(strict, tok)
        # The commands: exit 0 or one "error:" line, never a traceback.
        config = root / "config.yaml"
        config.write_text(json.dumps({k: v for k, v in settings_.items() if k != "on_bad_record"}))
        for argv in (["data", "validate", str(config)],
                     ["data", "inspect", str(config), "on_bad_record=skip", "--out", "", "--color", "never"]):
            out, err = io.StringIO(), io.StringIO()
            from contextlib import redirect_stderr, redirect_stdout

            with redirect_stdout(out), redirect_stderr(err):
                code = main(argv)
            assert code == (2 if bad and argv[1] == "validate" else 0), err.getvalue()
            assert "Traceback" not in err.getvalue()
            if code:
                assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=record_specs(with_blanks=True), compact=st.booleans())
def test_hostile_records_are_named_counted_and_skipped(tok, specs, compact) -> None:
    run_once(tok, specs, compact)


def test_every_hostile_kind_once(tok) -> None:
    """Each builder at least once, whatever hypothesis draws: the whole catalogue in one file set."""
    specs = ([("use", n) for n in USE] + [("bad", n) for n in BAD] + [("too_long", n) for n in TOO_LONG]
             + [("dup", "chat")] + [("blank", i) for i in range(len(BLANKS))])
    run_once(tok, [("use", "chat"), *specs], compact=True)


def test_nesting_just_under_the_parse_limit_is_a_bad_record_too(tmp_path: Path, tok) -> None:
    """Nesting that json.loads still takes can fail later, where the record is walked with a deeper
    stack (tool definitions re-encoded by mistral-common): that record is bad, not a crash. Where
    exactly depends on the stack, so depths around the limit run under a deeper stack."""
    lines = [_j(chat("q", "a"))]
    for depth in range(550, 850):
        params = b'{"type": "object", "properties": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
        lines.append(b'{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a"}], '
                     b'"tools": [{"type": "function", "function": {"name": "f", "description": "d", '
                     b'"parameters": %s}}]}' % (depth, params))
    p = tmp_path / "deep.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    cfg = config_from_dict({**_config_dict([p], tmp_path / "cache"), "sequence_len": 1_048_576})

    def under(frames: int):
        return under(frames - 1) if frames else build_dataset(cfg, tok)

    r = under(250).report
    assert r.records == len(lines) and r.records == r.records_used + r.rejected
    assert r.rejected and any("nested too deeply" in b for b in r.bad_examples)


def test_a_file_name_with_undecodable_bytes(tmp_path: Path, tok) -> None:
    """Origins hold the file name; its odd bytes (U+DCxx in Python) reach the rejects, duplicates
    and origins files and the printed report escaped, not as an encoding error."""
    p = tmp_path / "caf\udce9.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\nnot json\n')
    r = build_dataset(config_from_dict(_config_dict([p], tmp_path / "cache")), tok).report
    assert (r.records, r.records_used, r.rejected, r.dedup_exact) == (3, 1, 1, 1)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(_config_dict([p], tmp_path / "cache")), errors="surrogateescape")
    assert main(["data", "inspect", str(config), "--out", "", "--color", "never"]) == 0
