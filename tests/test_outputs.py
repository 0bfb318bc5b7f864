"""Output paths: mistral-tune never deletes or changes what it did not write, nor its inputs.

Each command is run through the CLI's main() on generated path layouts (the target is the source,
inside it, its parent, a symlink to it, an unrelated directory, an empty one, a file, '.', '~/x',
'$VAR/x', an earlier output of ours, ...; spelled absolute or relative, with or without --overwrite).
The whole workspace is snapshotted (every file's bytes, every link) before and after: a refusal
must change nothing and print one error line; an accepted target is the only thing that changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from _runs import SRC, make_assets
from export_fixtures import tiny_adapter
from mistral_tune.cli import main
from mistral_tune.errors import OutputError
from mistral_tune.fsutil import MARKER, check_target, mark_output, output_kind

COMMANDS = ("merge", "export adapter", "export gguf", "export awq", "train")
KIND = {"merge": "merged", "export adapter": "adapter", "export gguf": "gguf", "export awq": "awq", "train": "run"}
# Layouts a target can have; see _target.
ACCEPTED = {"new", "tilde", "var", "relative", "inside_other", "empty"}
REFUSED = {"source", "inside_source", "parent_of_source", "symlink_to_source", "inside_symlink_to_source", "other",
           "file", "under_file", "dot", "unset_var", "ours_other_kind", "base"}
LAYOUTS = sorted(ACCEPTED | REFUSED | {"ours"})
NAMES = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12).filter(lambda s: s[0] != "-")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny base model, its dataset and adapter, and an earlier output of ours of every kind, each made
    by the command itself (AWQ needs a GPU: its earlier output is a marked directory)."""
    root = tmp_path_factory.mktemp("assets")
    base, data = make_assets(root)
    adapter = tiny_adapter(base, root / "run" / "adapter")
    prev = root / "prev"
    prev.mkdir()
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        assert main(["merge", str(adapter), "--out", str(prev / "merged")]) == 0
        assert main(["export", "adapter", str(adapter), "--out", str(prev / "adapter")]) == 0
        assert main(["export", "gguf", str(adapter), "--out", str(prev / "gguf")]) == 0
        config = _train_config(root, base, data)
        assert main(["train", str(config), f"output_dir={prev / 'run'}", "max_steps=2"]) == 0
    (prev / "awq").mkdir()
    (prev / "awq" / "config.json").write_text("{}")
    mark_output(prev / "awq", "awq")
    return base, data, adapter, prev


def _train_config(root: Path, base: Path, data: Path) -> Path:
    cfg = dict(base_model=str(base), datasets=[{"path": str(data), "format": "messages"}], sequence_len=64,
               micro_batch_size=2, lora_r=4, lora_alpha=8, max_steps=1, save_steps=1, logging_steps=1, seed=7,
               output_dir=str(root / "unused"))
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: directories, links (their text) and files (their SHA-256)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            else:
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def _outside(snapshot: dict[str, tuple], rel: str) -> dict[str, tuple]:
    """The entries that are neither the target, inside it, nor one of the folders made to hold it."""
    parents = {str(p) for p in Path(rel).parents}
    return {k: v for k, v in snapshot.items() if k != rel and not k.startswith(rel + os.sep) and k not in parents}


def _workspace(ws: Path, assets, command: str, other_files: dict[str, bytes]) -> tuple[Path, Path]:
    """Lay out the inputs and the bystanders in ws; return (the command's source, its base model)."""
    base, data, adapter, prev = assets
    shutil.copytree(base, ws / "base")
    shutil.copytree(adapter, ws / "run" / "adapter")
    (ws / "data").mkdir()
    shutil.copy(data, ws / "data" / "train.jsonl")
    for name in ("home", "vardir", "empty", "other"):
        (ws / name).mkdir()
    for name, content in other_files.items():
        (ws / "other" / name).write_bytes(content)
    (ws / "file.txt").write_text("a file of the user's\n")
    kind = KIND[command]
    other_kind = "merged" if kind != "merged" else "adapter"
    copy = shutil.copy if (prev / kind).is_file() else shutil.copytree
    copy(prev / kind, ws / "ours")
    shutil.copytree(prev / other_kind, ws / "ours_other_kind")
    # train reads the base model; the exports read the adapter
    source = ws / "base" if command == "train" else ws / "run" / "adapter"
    (ws / "link").symlink_to(source, target_is_directory=True)
    return source, ws / "base"


def _target(ws: Path, layout: str, name: str, source: Path, spelling: str) -> tuple[str, Path | None]:
    """(the --out / output_dir text, the path it means; None where it names nothing to write)."""
    paths = {
        "new": ws / "out" / name, "inside_other": ws / "other" / "new" / name, "empty": ws / "empty",
        "ours": ws / "ours", "ours_other_kind": ws / "ours_other_kind", "source": source,
        "inside_source": source / name, "parent_of_source": source.parent, "symlink_to_source": ws / "link",
        "inside_symlink_to_source": ws / "link" / name, "other": ws / "other", "file": ws / "file.txt",
        "under_file": ws / "file.txt" / name, "base": ws / "base",
    }
    if layout in paths:
        path = paths[layout]
        rel = os.path.relpath(path, ws)
        text = {"absolute": str(path), "relative": rel, "dotted": f"./{rel}", "detour": f"empty/../{rel}",
                "slash": f"{path}/"}[spelling]
        return text, path
    return {"tilde": (f"~/{name}", ws / "home" / name), "var": (f"${{MT_TEST_OUT}}/{name}", ws / "vardir" / name),
            "relative": (name, ws / name), "dot": (".", ws), "unset_var": (f"$MT_TEST_UNSET/{name}", None)}[layout]


def _run(command: str, target: str, overwrite: bool, source: Path, ws: Path) -> tuple[int, str]:
    if command == "train":
        argv = ["train", str(ws / "train.yaml"), f"output_dir={target}"] + (["overwrite_output_dir=true"] if overwrite
                                                                         else [])
    else:
        argv = [*command.split(), str(source), "--out", target] + (["--overwrite"] if overwrite else [])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@contextlib.contextmanager
def _inside(ws: Path):
    """cwd = ws, HOME = ws/home, $MT_TEST_OUT = ws/vardir, no $MT_TEST_UNSET; put back afterwards."""
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.chdir(ws)
    os.environ.update(HOME=str(ws / "home"), MT_TEST_OUT=str(ws / "vardir"),
                      MISTRAL_TUNE_CACHE=str(ws.parent / "cache"))  # the token cache lives outside ws
    os.environ.pop("MT_TEST_UNSET", None)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _expected(command: str, layout: str, overwrite: bool) -> bool:
    if command == "export gguf" and layout == "empty":
        return False  # a directory where the .gguf file goes
    return layout in ACCEPTED or (layout == "ours" and overwrite)


def _check_command(command: str, assets, layout: str, name: str, spelling: str, overwrite: bool,
                   other_files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp).resolve() / "ws"
        ws.mkdir()
        source, base = _workspace(ws, assets, command, other_files)
        if command == "train":
            _train_config(ws, base, ws / "data" / "train.jsonl")
        text, path = _target(ws, layout, name, source, spelling)
        before = _snapshot(ws)
        inode = path.stat().st_ino if path is not None and path.exists() else None
        with _inside(ws):
            code, err = _run(command, text, overwrite, source, ws)
        after = _snapshot(ws)
        accepted = _expected(command, layout, overwrite)
        lines = err.strip().splitlines()
        case = f"{command} {layout} {text!r} overwrite={overwrite}: exit {code}, {err!r}"
        if not accepted or command == "export awq":
            # refused (or, for AWQ, accepted but stopped for want of llm-compressor / a GPU): nothing changes
            assert code == 2, case
            assert after == before, case
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, case
            path_error = "llm-compressor" not in err and "GPU" not in err
            assert path_error == (not accepted), case
            return
        assert code == 0, case
        rel = os.path.relpath(path, ws)
        assert _outside(after, rel) == _outside(before, rel), case
        if command == "export gguf":
            assert path.read_bytes()[:4] == b"GGUF", case
        else:
            assert output_kind(path) == KIND[command] and (path / MARKER).is_file(), case
        if layout == "ours" and command == "export gguf":  # replaced: a new file renamed into place
            assert path.stat().st_ino != inode, case
        elif layout == "ours":  # replaced: the marker names this workspace's source, not the earlier one's
            assert str(source) in json.loads((path / MARKER).read_text())["sources"], case


def _property(command: str, examples: int):
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.generate])  # no shrinking: every example is a whole command
    @given(layout=st.sampled_from(LAYOUTS), name=NAMES, overwrite=st.booleans(),
           spelling=st.sampled_from(["absolute", "relative", "dotted", "detour", "slash"]),
           other_files=st.dictionaries(NAMES, st.binary(max_size=64), min_size=1, max_size=3))
    def check(assets, layout, name, overwrite, spelling, other_files):
        _check_command(command, assets, layout, name, spelling, overwrite, other_files)
    return check


test_merge_output_paths = _property("merge", 30)
test_export_adapter_output_paths = _property("export adapter", 30)
test_export_gguf_output_paths = _property("export gguf", 20)
test_export_awq_output_paths = _property("export awq", 30)
test_train_output_dir = _property("train", 20)


def test_merge_into_the_run_through_the_installed_command(assets, tmp_path):
    """`mistral-tune merge RUN --out RUN` used to delete the run and exit 0; --out RUN/adapter to replace the
    adapter with the merged model."""
    run = tmp_path / "run"
    shutil.copytree(assets[2].parent, run)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for out, extra in ((run, []), (run / "adapter", ["--overwrite"])):  # more layouts: the properties above
        proc = subprocess.run([sys.executable, "-m", "mistral_tune.cli", "merge", str(run), "--out", str(out),
                               *extra], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: --out ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "input" in proc.stderr
        assert _snapshot(tmp_path) == before


def test_resume_continues_our_run_and_refuses_anything_else(assets, tmp_path):
    base, data, _, prev = assets
    config = _train_config(tmp_path, base, data)
    run = tmp_path / "run"
    shutil.copytree(prev / "run", run)
    quiet = contextlib.redirect_stdout(io.StringIO())
    err = io.StringIO()
    with quiet, contextlib.redirect_stderr(err):
        # a fresh run does not overwrite a run with checkpoints; resume continues it
        assert main(["train", str(config), f"output_dir={run}", "max_steps=2"]) == 2
        assert "holds an earlier training run" in err.getvalue() and "resume: auto" in err.getvalue()
        assert main(["train", str(config), f"output_dir={run}", "max_steps=3", "resume=auto", "--force"]) == 0
        assert (run / "checkpoint-3").is_dir() and output_kind(run) == "run"
        # resume into a directory that is not ours: refused, untouched
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "metrics.jsonl").write_text("my own\n")
        before = _snapshot(tmp_path / "notes")
        assert main(["train", str(config), f"output_dir={tmp_path / 'notes'}", "resume=auto"]) == 2
        assert _snapshot(tmp_path / "notes") == before
        assert "not written by mistral-tune" in err.getvalue().splitlines()[-1]


def test_outputs_of_versions_without_the_marker(assets, tmp_path):
    """A run directory (its config.yaml, data_report.json, metrics.jsonl) and what the run wrote in it count
    as ours; a merged model without a marker does not, even with --overwrite; a file is no output_dir."""
    _, _, _, prev = assets
    run = tmp_path / "run"
    shutil.copytree(prev / "run", run)
    shutil.copytree(prev / "merged", run / "merged")
    for marked in run.rglob(MARKER):
        marked.unlink()
    assert output_kind(run) == "run" and output_kind(run / "adapter") == "adapter"
    assert output_kind(run / "merged") == "merged"  # inside a run of ours
    assert check_target(run, "run", overwrite=True) == run
    shutil.copytree(run / "merged", tmp_path / "loose-merged")
    assert output_kind(tmp_path / "loose-merged") is None
    with pytest.raises(OutputError, match="not written by mistral-tune"):
        check_target(tmp_path / "loose-merged", "merged", overwrite=True)
    quick = tmp_path / "quickstart-output"
    quick.mkdir()
    shutil.copytree(run, quick / "run")
    (quick / "quickstart.yaml").write_text("{}\n")
    assert check_target(quick, "quickstart", overwrite=True) == quick
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_target(tmp_path / "a-file", "run", overwrite=True)


def test_quickstart_reuses_its_own_directory_and_refuses_another(tmp_path, monkeypatch):
    from mistral_tune import quickstart
    from mistral_tune.train import loop

    def stopped(cfg, echo=print, merge=False, force=False):  # the training itself is the train tests' business
        out = check_target(cfg.output_dir, "run", overwrite=cfg.overwrite_output_dir)
        out.mkdir(exist_ok=True)
        mark_output(out, "run")
        return loop.TrainResult(out, None, None, 1, 1.0, None, stopped_by="SIGTERM", checkpoint_dir=None)

    monkeypatch.setattr(loop, "train", stopped)
    run_quickstart = quickstart.run_quickstart
    work = tmp_path / "quickstart-output"
    run_quickstart(work, echo=lambda _: None)
    model = _snapshot(work / "base-model")
    run_quickstart(work, echo=lambda _: None)  # again: its own directory, reused; the base model kept
    assert _snapshot(work / "base-model") == model and output_kind(work) == "quickstart"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "quickstart.yaml").write_text("my own file\n")
    with pytest.raises(OutputError, match="not written by mistral-tune"):
        run_quickstart(mine, echo=lambda _: None)
    assert (mine / "quickstart.yaml").read_text() == "my own file\n" and len(list(mine.iterdir())) == 1


# ---- generate (a file), init-model and data inspect (directories): the same rule, smaller layouts ----

SMALL_LAYOUTS = ("new", "input", "link_to_input", "users_file", "users_dir", "ours", "empty_file")


def _small_workspace(ws: Path, assets, command: str) -> dict[str, Path]:
    base, data, _, prev = assets
    shutil.copytree(base, ws / "base")
    shutil.copy(data, ws / "train.jsonl")
    (ws / "prompts.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "a second one"}\n')
    (ws / "config.yaml").write_text(yaml.safe_dump({"base_model": str(ws / "base"), "sequence_len": 64,
                                                   "datasets": [{"path": str(ws / "train.jsonl")}]}))
    (ws / "users_file.jsonl").write_text('{"mine": 1}\n')
    (ws / "users_dir").mkdir()
    (ws / "users_dir" / "notes.txt").write_text("the user's own\n")
    (ws / "empty_file.jsonl").write_text("")
    (ws / "link.jsonl").symlink_to(ws / "prompts.jsonl")
    ours = ws / "ours"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):  # an earlier output of this command
        assert main(_small_argv(command, ws, str(ours) + (".jsonl" if command == "generate" else ""))) == 0
    if command == "generate":
        (ws / "ours.jsonl.tmp").write_text("a bystander that only looks like a temporary file\n")
    return {"new": ws / "new" / ("o.jsonl" if command == "generate" else "d"), "input": ws / "prompts.jsonl",
            "link_to_input": ws / "link.jsonl", "users_file": ws / "users_file.jsonl", "users_dir": ws / "users_dir",
            "ours": ws / ("ours.jsonl" if command == "generate" else "ours"), "empty_file": ws / "empty_file.jsonl"}


def _small_argv(command: str, ws: Path, target: str, overwrite: bool = False) -> list[str]:
    extra = ["--overwrite"] if overwrite else []
    if command == "generate":
        return ["generate", str(ws / "base"), str(ws / "prompts.jsonl"), "--out", target, "--max-tokens", "3", *extra]
    if command == "init-model":
        return ["init-model", target, *extra]
    return ["data", "inspect", str(ws / "config.yaml"), "--out", target, "--color", "never", "-n", "1"]


def _small_expected(command: str, layout: str, overwrite: bool) -> bool:
    if layout == "new":
        return True
    if layout == "ours":
        return overwrite or command == "data inspect"  # inspect reuses its own folder, as quickstart does
    return command == "generate" and layout == "empty_file" and overwrite  # an empty file has nothing to lose


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.generate])
@given(command=st.sampled_from(["generate", "init-model", "data inspect"]), layout=st.sampled_from(SMALL_LAYOUTS),
       overwrite=st.booleans())
def test_generate_init_model_and_inspect_write_only_their_own_outputs(assets, command, layout, overwrite):
    """`generate --out PROMPTS` used to replace the prompts with the completions; `init-model` and
    `data inspect --out` wrote into any directory. Now: the input, a link to it, a user's file or folder are
    refused with one error line and nothing changes; an earlier output of the same command is replaced
    only with --overwrite (inspect's own folder always); a new path is written."""
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp).resolve() / "ws"
        ws.mkdir()
        with _inside(ws):
            targets = _small_workspace(ws, assets, command)
            target = targets[layout]
            before = _snapshot(ws)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(_small_argv(command, ws, str(target), overwrite))
        after = _snapshot(ws)
        case = f"{command} {layout} overwrite={overwrite}: exit {code}, {err.getvalue()!r}"
        if not _small_expected(command, layout, overwrite):
            assert code == 2 and after == before, case
            assert err.getvalue().startswith("error: ") and err.getvalue().count("\n") == 1, case
            return
        assert code == 0, case
        rel = os.path.relpath(target, ws)
        assert _outside(after, rel) == _outside(before, rel), case
        if command == "generate":
            rows = [json.loads(line) for line in target.read_text().splitlines()]
            assert [r["prompt"] for r in rows] == ["hello", "a second one"] and "completion" in rows[0], case
        else:
            assert output_kind(target) == ("tiny" if command == "init-model" else "inspect"), case
