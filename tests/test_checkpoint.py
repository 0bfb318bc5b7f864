"""Checkpoints: contents, exact resume (LoRA and full), damaged files, pruning, no unpickling, full disk."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _runs import config, make_assets, metrics, same_tensors, tensors
from mistral_tune.config import Config
from mistral_tune.errors import CheckpointError, ConfigError
from mistral_tune.train import checkpoint as ckpt_mod
from mistral_tune.train.checkpoint import FORMAT, MANIFEST, REQUIRED, CheckpointManager
from mistral_tune.train.loop import train
from mistral_tune.train.resume import config_changes, find_resume_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "mistral_tune"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """A finished LoRA run: dropout (so torch's RNG matters), a held-out set, checkpoints kept."""
    out = tmp_path_factory.mktemp("lora") / "run"
    model, data = assets
    cfg = config(model, data, out, lora_dropout=0.1, val_set_size=8, save_total_limit=20)
    result = train(cfg, echo=lambda _: None)
    return cfg, result


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _steps(out: Path) -> list[int]:
    names = [p.name for p in out.glob("checkpoint-*")]
    return sorted(int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n))


def test_checkpoints_hold_everything_and_validate(lora_run):
    cfg, result = lora_run
    out = result.output_dir
    # every save_steps (5), each epoch end (56 train samples -> 8 steps per epoch), and the last step
    assert _steps(out) == [5, 8, 10, 15, 16, 20]
    ck = CheckpointManager.validate(out / "checkpoint-10")
    manifest = json.loads((out / "checkpoint-10" / "manifest.json").read_text())
    assert set(REQUIRED) | {"adapter_config.json", "adapter_model.safetensors"} == set(manifest["files"])
    assert ck.step == 10 and ck.state["progress"]["step"] == 10
    assert ck.config == cfg.model_dump(mode="json")
    assert set(ck.state["rng"]) == {"python", "numpy"} and "torch_cpu" in tensors(ck.path / "rng.safetensors")
    assert ck.state["data"]["epoch"] == 1 and ck.state["data"]["offset"] == 4  # 10 steps x 2 rows, 16 per epoch
    opt = tensors(ck.path / "optimizer.safetensors")
    trainable = tensors(ck.path / "trainable.safetensors")
    assert {f"{n}::{k}" for n in trainable for k in ("exp_avg", "exp_avg_sq", "step")} == set(opt)
    # metrics so far: the run's log, byte for byte, up to step 10's lines (its eval line included)
    log = (out / "metrics.jsonl").read_text()
    assert log.startswith(ck.metrics_text())
    assert '"step": 10, "eval_loss"' in ck.metrics_text().splitlines()[-1]
    assert ck.state["eval_loss"] is not None


def test_resume_from_a_checkpoint_repeats_the_run_exactly(lora_run, tmp_path):
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    echoed = []
    again = train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-10")}),
                  echo=echoed.append)
    assert again.steps == 20
    assert any("resumed from" in e and "checkpoint-10" in e for e in echoed)
    # newer checkpoints of the original future were renamed, not deleted, then written anew
    assert sorted(p.name for p in out.glob("checkpoint-*.superseded")) == [
        "checkpoint-15.superseded", "checkpoint-16.superseded", "checkpoint-20.superseded"]
    assert metrics(out) == metrics(result.output_dir)  # loss, lr, grad_norm, eval loss: bit-identical
    assert same_tensors(tensors(out / "adapter" / "adapter_model.safetensors"),
                        tensors(result.adapter_dir / "adapter_model.safetensors"))


def test_full_finetune_resumes_exactly(assets, tmp_path):
    model, data = assets
    out = tmp_path / "full"
    cfg = config(model, data, out, adapter="none", learning_rate=1e-3, max_steps=8, save_steps=4)
    first = train(cfg, echo=lambda _: None)
    copy = _copy_run(out, tmp_path / "copy")
    train(cfg.model_copy(update={"output_dir": str(copy), "resume": "auto"}), echo=lambda _: None)  # nothing left
    again = train(cfg.model_copy(update={"output_dir": str(copy), "resume": str(copy / "checkpoint-4")}),
                  echo=lambda _: None)
    assert again.steps == first.steps == 8
    trainable = tensors(copy / "checkpoint-8" / "trainable.safetensors")
    assert "model.embed_tokens.weight" in trainable and "lm_head.weight" in trainable  # all weights trained
    assert metrics(copy) == metrics(out)
    assert same_tensors(trainable, tensors(out / "checkpoint-8" / "trainable.safetensors"))
    assert same_tensors(tensors(copy / "checkpoint-8" / "optimizer.safetensors"),
                        tensors(out / "checkpoint-8" / "optimizer.safetensors"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated optimizer": ("optimizer.safetensors", _truncate, "truncated or modified"),
    "modified weights": ("trainable.safetensors", _flip_byte, "SHA-256 does not match"),
    "missing rng": ("rng.safetensors", Path.unlink, "missing"),
    "unreadable manifest": ("manifest.json", lambda p: p.write_text("{not json"), "unreadable"),
    "no manifest (save never finished)": ("manifest.json", Path.unlink, "never completed"),
    "modified state": ("state.json", lambda p: p.write_text(p.read_text().replace('"step": 20', '"step": 19')),
                       "does not match"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_checkpoint_is_detected_naming_the_file(lora_run, tmp_path, kind):
    name, damage, says = CORRUPTIONS[kind]
    ck = _copy_run(lora_run[1].output_dir / "checkpoint-20", tmp_path / "checkpoint-20")
    damage(ck / name)
    with pytest.raises(CheckpointError) as err:
        CheckpointManager.validate(ck)
    assert str(ck / name) in str(err.value) and says in str(err.value)


def test_auto_falls_back_to_the_newest_valid_checkpoint_and_says_so(lora_run, tmp_path):
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    _truncate(out / "checkpoint-20" / "optimizer.safetensors")
    _flip_byte(out / "checkpoint-16" / "trainable.safetensors")
    echoed = []
    train(cfg.model_copy(update={"output_dir": str(out), "resume": "auto"}), echo=echoed.append)
    text = "\n".join(echoed)
    assert str(out / "checkpoint-20" / "optimizer.safetensors") in text
    assert str(out / "checkpoint-16" / "trainable.safetensors") in text
    assert "falling back to checkpoint-15" in text
    assert (out / "checkpoint-20.corrupt").is_dir() and (out / "checkpoint-16.corrupt").is_dir()
    assert metrics(out) == metrics(result.output_dir)  # steps 16-20 done again, identically
    CheckpointManager.validate(out / "checkpoint-20")


# Any JSON value: what a damaged or hand-edited manifest can hold where a field should be.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _newest_two(lora_run, root: Path) -> tuple[Path, Path, Path]:
    """A run directory holding copies of the two newest checkpoints: (run, newest, the one before)."""
    out = lora_run[1].output_dir
    newest, before = sorted(out.glob("checkpoint-*"), key=ckpt_mod.checkpoint_step)[-1:-3:-1]
    run = root / "run"
    for ck in (newest, before):
        shutil.copytree(ck, run / ck.name)
    return run, run / newest.name, run / before.name


def _falls_back(lora_run, run: Path, damaged: Path, fallback: Path) -> None:
    echoed = []
    cfg = lora_run[0].model_copy(update={"output_dir": str(run), "resume": "auto"})
    ckpt = find_resume_checkpoint(cfg, CheckpointManager(run, 3, echoed.append), echoed.append)
    assert ckpt.path == fallback
    assert f"checkpoint {damaged.name} is not usable: {damaged}" in echoed[0]
    assert f"falling back to {fallback.name}" in echoed[-1]


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_wrong_typed_manifest_is_a_damaged_checkpoint(lora_run, data):
    """Valid JSON with a field of the wrong type, or missing, at every level of the manifest: the checkpoint
    is reported as damaged (naming it) and resume: auto falls back to the one before; never an exception."""
    with tempfile.TemporaryDirectory() as tmp:
        run, newest, before = _newest_two(lora_run, Path(tmp))
        manifest = json.loads((newest / MANIFEST).read_text())
        broken = copy.deepcopy(manifest)
        name = data.draw(st.sampled_from(sorted(manifest["files"])), label="file")
        entry = manifest["files"][name]
        field = data.draw(st.sampled_from(["manifest", "format", "step", "files", "entry", "size", "sha256"]))
        holder, key, right = {
            "format": (broken, "format", FORMAT), "step": (broken, "step", manifest["step"]),
            "files": (broken, "files", manifest["files"]), "entry": (broken["files"], name, entry),
            "size": (broken["files"][name], "size", entry["size"]),
            "sha256": (broken["files"][name], "sha256", entry["sha256"]), "manifest": (None, None, manifest),
        }[field]
        if field != "manifest" and data.draw(st.booleans(), label="delete it"):
            del holder[key]
        else:
            valid_step = field == "step" and (lambda v: type(v) is int and v >= 0)
            value = data.draw(JSON.filter(lambda v: v != right and not (valid_step and valid_step(v))), label="value")
            if field == "manifest":
                broken = value
            else:
                holder[key] = value
        (newest / MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError):
            CheckpointManager.validate(newest)
        _falls_back(lora_run, run, newest, before)


@settings(max_examples=30, deadline=None)
@given(part=st.sampled_from(["state.json", "config.json"]), value=JSON.filter(lambda v: not isinstance(v, dict)))
def test_state_or_config_that_is_not_an_object_is_a_damaged_checkpoint(lora_run, part, value):
    """Even with the manifest's checksums fixed to match, a state.json or config.json that is a JSON list,
    number, ... cannot be resumed from: damaged, and resume: auto falls back."""
    with tempfile.TemporaryDirectory() as tmp:
        run, newest, before = _newest_two(lora_run, Path(tmp))
        (newest / part).write_text(json.dumps(value))
        manifest = json.loads((newest / MANIFEST).read_text())
        manifest["files"][part] = {"size": (newest / part).stat().st_size, "sha256": ckpt_mod._sha256(newest / part)}
        (newest / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=re.escape(str(newest / part))):
            CheckpointManager.validate(newest)
        _falls_back(lora_run, run, newest, before)


def test_resume_path_to_a_damaged_checkpoint_refuses(lora_run, tmp_path):
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    (out / "checkpoint-15" / "state.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(out / "checkpoint-15" / "state.json"))):
        train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-15")}),
              echo=lambda _: None)


def test_prune_keeps_the_newest_and_the_best(lora_run, tmp_path):
    out = _copy_run(lora_run[1].output_dir, tmp_path / "run")
    evals = {p: json.loads((p / "state.json").read_text())["eval_loss"] for p in out.glob("checkpoint-*")}
    best = min(evals, key=evals.get)
    CheckpointManager(out, keep_last=2).prune()
    assert set(out.glob("checkpoint-*")) == {out / "checkpoint-20", out / "checkpoint-16", best}


class _Payload:
    """Unpickling this runs code (creates a file): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_a_checkpoint_cannot_run_code(lora_run, tmp_path):
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    marker = tmp_path / "code-ran"
    target = out / "checkpoint-20" / "optimizer.safetensors"
    target.write_bytes(pickle.dumps(_Payload(marker)))  # a torch.save-style pickle in place of the tensors
    manifest_path = out / "checkpoint-20" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["optimizer.safetensors"] = {"size": target.stat().st_size, "sha256": ckpt_mod._sha256(target)}
    manifest_path.write_text(json.dumps(manifest))  # the attacker fixes the checksums too
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train(cfg.model_copy(update={"output_dir": str(out), "resume": str(out / "checkpoint-20")}),
              echo=lambda _: None)
    assert not marker.exists()


def test_no_pickle_in_loading_code():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "trust_remote_code=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_full_disk_keeps_the_previous_checkpoint_and_stops(assets, tmp_path, monkeypatch):
    model, data = assets
    out = tmp_path / "run"
    real_save = ckpt_mod.save_file
    calls = []

    def save_file_on_a_full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 3:  # the first checkpoint's three tensor files fit; then the disk is full
            Path(filename).write_bytes(b"\0" * 100)  # what a partial write leaves
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file_on_a_full_disk)
    with pytest.raises(CheckpointError) as err:
        train(config(model, data, out, max_steps=12, save_steps=5), echo=lambda _: None)
    msg = str(err.value)
    # 17 packed rows in micro-batches of 2: the epoch ends at step 9, whose checkpoint hits the full disk
    assert str(out / "checkpoint-9") in msg and "No space left on device" in msg
    assert "checkpoint-5 is intact" in msg and "resume=auto" in msg
    assert _steps(out) == [5]  # the failed checkpoint left nothing
    assert not list(out.glob(".checkpoint-*"))
    CheckpointManager.validate(out / "checkpoint-5")
    assert not (out / "adapter").exists()  # training stopped; it did not go on without checkpoints
    assert metrics(out)[-1]["step"] == 9


def test_interrupt_while_saving_leaves_no_partial_checkpoint(tmp_path):
    layer = torch.nn.Linear(4, 4)
    named = dict(layer.named_parameters())
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 4)).sum().backward()
    opt.step()
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, named, opt, {"progress": {}}, {}, tmp_path / "metrics.jsonl")

    def second_ctrl_c(directory: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manager.save(2, named, opt, {"progress": {}}, {}, tmp_path / "metrics.jsonl", write_extra=second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # re-saving an existing step: the old one must survive
        manager.save(1, named, opt, {"progress": {}}, {}, tmp_path / "metrics.jsonl", write_extra=second_ctrl_c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    CheckpointManager.validate(tmp_path / "checkpoint-1")


def test_changed_config_is_refused_with_the_differences(lora_run, tmp_path):
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    resume = {"output_dir": str(out), "resume": str(out / "checkpoint-15")}
    with pytest.raises(ConfigError) as err:
        train(cfg.model_copy(update={**resume, "learning_rate": 0.02, "logging_steps": 2}), echo=lambda _: None)
    assert "learning_rate: 0.01 -> 0.02" in str(err.value) and "logging_steps: 1 -> 2" in str(err.value)
    assert "--force" in str(err.value)
    with pytest.raises(ConfigError, match="cannot change in a resumed run: learning_rate"):
        train(cfg.model_copy(update={**resume, "learning_rate": 0.02}), echo=lambda _: None, force=True)
    # safe keys with --force: the steps up to the old end are the same run, then it goes on to 24
    longer = train(cfg.model_copy(update={**resume, "logging_steps": 2, "max_steps": 24}), echo=lambda _: None,
                   force=True)
    assert longer.steps == 24 and metrics(out)[-1]["step"] == 24


def test_full_disk_at_the_final_save_points_to_the_last_checkpoint(assets, tmp_path, monkeypatch):
    import mistral_tune.models.peft_format as lora_mod

    model, data = assets
    out = tmp_path / "run"
    real_save = lora_mod.save_file

    def save_file(tensors_, filename, metadata=None):
        if "/.adapter.tmp-" in filename:  # the final adapter's temporary directory, not a checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors_, filename, metadata=metadata)

    monkeypatch.setattr(lora_mod, "save_file", save_file)
    with pytest.raises(CheckpointError) as err:
        train(config(model, data, out, max_steps=6), echo=lambda _: None)
    assert f"{out / 'adapter'}: could not be written (No space left on device)" in str(err.value)
    assert f"the trained state is in {out / 'checkpoint-6'}" in str(err.value)
    CheckpointManager.validate(out / "checkpoint-6")
    assert not (out / "adapter").exists() and not list(out.glob(".adapter*"))


def test_resume_and_overwrite_cannot_be_combined(assets, tmp_path):
    model, data = assets
    with pytest.raises(ConfigError, match="set resume or overwrite_output_dir, not both"):
        config(model, data, tmp_path / "run", resume="auto", overwrite_output_dir=True)


def test_resume_inside_a_logging_window_writes_the_same_lines(assets, tmp_path):
    """logging_steps 4, checkpoints every 5: checkpoint-5 holds step 5, which the line at step 8
    averages with steps 6-8. A run resumed there writes that line as the uninterrupted run did."""
    model, data = assets
    out = tmp_path / "run"
    cfg = config(model, data, out, logging_steps=4, save_steps=5, max_steps=12, save_total_limit=10)
    train(cfg, echo=lambda _: None)
    copy = _copy_run(out, tmp_path / "copy")
    train(cfg.model_copy(update={"output_dir": str(copy), "resume": str(copy / "checkpoint-5")}), echo=lambda _: None)
    assert [r["step"] for r in metrics(out)] == [4, 8, 12]
    assert metrics(copy) == metrics(out)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["window_steps"] == 4


def test_evaluation_follows_eval_steps_and_not_a_checkpoint_a_step_later(assets, tmp_path):
    """eval_steps 7 and an epoch (so a checkpoint) ending at step 8: the held-out set is evaluated at
    7, 14 and the last step, not again at 8; without eval_steps, at every checkpoint."""
    model, data = assets
    cfg = config(model, data, tmp_path / "grid", val_set_size=8, eval_steps=7, save_steps=None, max_steps=16)
    out = train(cfg, echo=lambda _: None).output_dir
    assert _steps(out) == [8, 16]  # epoch ends (56 training samples: 8 steps each)
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [7, 14, 16]
    assert json.loads((out / "checkpoint-8" / "state.json").read_text())["eval_loss"] is None
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path / "ckpt"), "eval_steps": None})
    out = train(cfg, echo=lambda _: None).output_dir
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [8, 16]


def _save_config_without(checkpoint: Path, keys: list[str]) -> None:
    """Rewrite a checkpoint's config.json without `keys`, as a run of an older mistral-tune (before those
    keys existed) wrote it, with a manifest entry that fits."""
    saved = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in keys}))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    data = (checkpoint / "config.json").read_bytes()
    manifest["files"]["config.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_from_before_new_config_keys_resumes_when_they_hold_their_defaults(lora_run, tmp_path):
    """The saved config lacks keys added since: at their defaults they are no change and the run resumes;
    one set to another value is a change, reported as from (absent)."""
    cfg, result = lora_run
    out = _copy_run(result.output_dir, tmp_path / "run")
    _save_config_without(out / "checkpoint-15", ["overlap_gradient_sync", "neftune_noise_alpha", "eval",
                                                 "distributed_timeout"])
    CheckpointManager.validate(out / "checkpoint-15")
    resume = {"output_dir": str(out), "resume": str(out / "checkpoint-15")}
    with pytest.raises(ConfigError, match="differs from the checkpoint's: neftune_noise_alpha: '.absent.' -> 5.0. "
                                          "Resume with"):  # the only change listed
        train(cfg.model_copy(update={**resume, "neftune_noise_alpha": 5.0}), echo=lambda _: None)
    resumed = train(cfg.model_copy(update=resume), echo=lambda _: None)
    assert resumed.steps == 20
    assert metrics(out) == metrics(result.output_dir)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_keys_absent_from_the_saved_config_count_as_changed_only_away_from_their_default(lora_run, data):
    """Any set of keys dropped from a run's saved config: exactly those whose value in the run differs
    from what a config that does not mention them gets are reported, each as from (absent)."""
    cfg, _ = lora_run
    saved = cfg.model_dump(mode="json")
    keys = sorted(set(saved) - {"resume", "overwrite_output_dir", "output_dir"})
    dropped = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    old = {k: v for k, v in saved.items() if k not in dropped}
    unset = Config(datasets=cfg.datasets).model_dump(mode="json")  # every key but datasets at its default
    changes = config_changes(old, saved)
    assert sorted(k for k, _, _ in changes) == sorted(k for k in dropped if k == "datasets" or saved[k] != unset[k])
    assert all(o == "(absent)" for _, o, _ in changes)
