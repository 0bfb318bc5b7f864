"""Training checkpoints: everything a run needs to continue exactly, written atomically, checked on read.

A checkpoint is a directory `checkpoint-<step>` in output_dir:

  trainable.safetensors  the trainable parameters under their model names (LoRA A/B, or all weights)
  optimizer.safetensors  optimizer state tensors per parameter: `<name>::exp_avg`, `::exp_avg_sq`, `::step`
                         (adamw_8bit: bitsandbytes' `::state1`, `::state2`, their block scales `::absmax1`,
                         `::absmax2` and maps `::qmap1`, `::qmap2`; its step count in state.json)
  rng.safetensors        torch CPU (and CUDA) generator states; of a multi-process run, every rank's
  state.json             step, data position, micro-batch shape, guard state, Python and NumPy RNG states
  config.json            the resolved config of the run
  metrics.jsonl          the run's metrics.jsonl as it was at this step
  adapter_*              (LoRA) the adapter in PEFT format, usable as is
  manifest.json          size and SHA-256 of every file above; written last

A run whose weights are sharded over processes (FSDP2) writes, instead of the first two files,
`shard-<rank>-model-00001-of-00001.safetensors`: each process's rows of the same tensors (weights and
`<name>::<field>` optimizer state), written by every process at once through
torch.distributed.checkpoint, with where each piece belongs in the file's JSON header. It is read
back on any number of processes (each reads the rows it now holds), or on one.

It is written into a hidden temporary directory, every file fsync'ed, then renamed into place, so a
crash, a full disk or a second Ctrl-C leaves either the whole checkpoint or none of it. Reading
never unpickles: tensors come from safetensors, everything else from JSON, so loading a checkpoint
cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError
from ..models.load import local_part

FORMAT = "mistral-tune-checkpoint/1"
FORMAT_SHARDED = "mistral-tune-checkpoint-sharded/1"
MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json",
            "config.json", "metrics.jsonl")
REQUIRED_SHARDED = ("rng.safetensors", "state.json", "config.json", "metrics.jsonl")
_NAME = re.compile(r"^checkpoint-(\d+)$")
_FILE_NAME = re.compile(r"[\w][\w.-]{0,200}", re.ASCII)  # a file in the checkpoint directory, no path
_SHARD = re.compile(r"^shard-\d+-model-\d+-of-\d+\.safetensors$")
_SEP = "::"


def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    # allow_nan=False: state must stay readable by strict JSON parsers; non-finite values are stored as null
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """Every generator the run draws from: Python, NumPy (as JSON), torch CPU and CUDA (as tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    as_json = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return as_json, tensors


def restore_rng(as_json: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different GPU count: the CPU stream is still exact; say what is not
            print(f"warning: checkpoint has {len(cuda)} CUDA generator state(s), this machine "
                  f"{torch.cuda.device_count()}; CUDA random streams restart from the seed")


# ---------------------------------------------------------------------------------------- optimizer


def optimizer_tensors(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> tuple[dict, dict]:
    """(tensors, json) holding the optimizer's per-parameter state keyed by parameter name."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict] = {}
    for name, p in named.items():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):  # a copy: bitsandbytes' parameters share one quantization
                # map (qmap1, qmap2), and safetensors refuses tensors that share memory
                tensors[f"{name}{_SEP}{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                plain.setdefault(name, {})[key] = value
    return tensors, plain


def optimizer_state_targets(optimizer: torch.optim.Optimizer,
                            named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors under their checkpoint names (`<name>::<field>`), made (zeros, as
    AdamW's first step makes them) where it has taken no step yet, so that a checkpoint can be read
    into them."""
    fused = any(g.get("fused") for g in optimizer.param_groups)
    targets = {}
    for name, p in named.items():
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        targets.update({f"{name}{_SEP}{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return targets


def save_shards(directory: Path, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its rows of the weights and the optimizer state into `directory` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    try:
        dcp.save({**named, **optimizer_state_targets(optimizer, named)},
                 storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
    except Exception as exc:  # torch.distributed.checkpoint raises every rank's failure on every rank
        raise CheckpointError(f"{directory}: could not write the shards ({str(exc).splitlines()[0][:300]}); "
                              "free space and resume with resume=auto") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter],
                         tensors: dict[str, torch.Tensor], plain: dict, source: Path) -> None:
    per_param: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.partition(_SEP)
        per_param.setdefault(name, {})[field] = value
    for name, extra in plain.items():
        per_param.setdefault(name, {}).update(extra)
    unknown = sorted(set(per_param) - set(named))
    if unknown:
        raise CheckpointError(f"{source}: optimizer state for {len(unknown)} parameter(s) this model does not "
                              f"train, e.g. {unknown[0]}")
    for name, fields in per_param.items():  # whole tensors into a sharded model: each process's rows
        p = named[name]
        if isinstance(p, DTensor):
            for key, value in fields.items():
                if isinstance(value, torch.Tensor) and value.ndim:
                    fields[key] = DTensor.from_local(local_part(p, value).to(p.device), p.device_mesh, p.placements,
                                                     shape=p.shape, stride=p.stride())
    # Through load_state_dict so torch puts each tensor on the device and dtype its optimizer expects.
    current = optimizer.state_dict()
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {index[id(named[name])]: value for name, value in per_param.items()}
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


# ------------------------------------------------------------------------------------- checkpoints


def _read_manifest(path: Path) -> tuple[int, dict[str, tuple[int, str]], bool]:
    """(step, {file name: (size, sha256)}, sharded); ValueError naming the first field of the wrong type
    or missing."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") not in (FORMAT, FORMAT_SHARDED):
        raise ValueError(f"format {_short(manifest.get('format'))}, expected {FORMAT!r} or {FORMAT_SHARDED!r}")
    step, files = manifest.get("step"), manifest.get("files")
    if type(step) is not int or step < 0:  # bool is an int subclass: not a step
        raise ValueError(f"step is {_short(step)}, expected a step number")
    if not isinstance(files, dict):
        raise ValueError(f"files is {_short(files)}, expected an object")
    entries = {}
    for name, entry in files.items():
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"lists {_short(name)}, not a file name inside the checkpoint")
        size, sha256 = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if type(size) is not int or not isinstance(sha256, str):
            raise ValueError(f"files[{name!r}] is {_short(entry)}, expected {{\"size\": bytes, \"sha256\": digest}}")
        entries[name] = (size, sha256)
    return step, entries, manifest["format"] == FORMAT_SHARDED


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Checkpoint:
    """A checkpoint that passed validation, with its JSON parts read."""

    path: Path
    step: int
    state: dict
    config: dict
    sharded: bool = False  # written by processes that each held a shard (FORMAT_SHARDED)

    def metrics_text(self) -> str:
        return (self.path / "metrics.jsonl").read_text(encoding="utf-8")

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / name))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path / name}: not a readable safetensors file ({exc})") from None

    def load_weights(self, named: dict[str, torch.nn.Parameter]) -> None:
        if self.sharded:
            self._load_shards(named)
            return
        tensors = self._tensors("trainable.safetensors")
        missing, unexpected = set(named) - set(tensors), set(tensors) - set(named)
        if missing or unexpected:
            example = sorted(missing or unexpected)[0]
            raise CheckpointError(
                f"{self.path / 'trainable.safetensors'}: does not fit this model's trainable parameters "
                f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {example})"
            )
        with torch.no_grad():
            for name, p in named.items():
                t = tensors[name]
                if t.shape != p.shape:
                    raise CheckpointError(f"{self.path / 'trainable.safetensors'}: {name} has shape "
                                          f"{tuple(t.shape)}, the model {tuple(p.shape)}")
                (p.to_local() if isinstance(p, DTensor) else p).copy_(local_part(p, t))

    def load_optimizer(self, optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> None:
        if self.sharded:
            self._load_shards(named, optimizer)
            return
        load_optimizer_state(optimizer, named, self._tensors("optimizer.safetensors"),
                             self.state.get("optimizer_plain", {}), self.path / "optimizer.safetensors")

    def _load_shards(self, named: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer | None = None) -> None:
        """Weights (or, with the optimizer, its state) from the shard files, into whatever this process holds:
        its own rows when sharded, whole tensors otherwise. Every process calls it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        targets = dict(named) if optimizer is None else optimizer_state_targets(optimizer, named)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # one process reading a sharded checkpoint is intended; torch warns that it assumes so
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(self.path)),
                         no_dist=not torch.distributed.is_initialized())
        except Exception as exc:  # torch.distributed.checkpoint reports every rank's failure as one exception
            raise CheckpointError(f"{self.path}: the shards do not fit this run "
                                  f"({str(exc).splitlines()[0][:300]})") from None

    def restore_rng(self, rank: int = 0, device: torch.device | None = None) -> None:
        """The generators as they were at this step: rank 0's (Python, NumPy, torch), then this rank's own
        torch ones. A rank the checkpoint has none for (it was written by fewer processes) keeps its
        seed + rank stream."""
        tensors = self._tensors("rng.safetensors")
        if rank and f"rank{rank}.torch_cpu" not in tensors:
            return
        restore_rng(self.state["rng"], tensors)
        if rank:
            torch.set_rng_state(tensors[f"rank{rank}.torch_cpu"])
            if device is not None and device.type == "cuda" and f"rank{rank}.cuda" in tensors:
                torch.cuda.set_rng_state(tensors[f"rank{rank}.cuda"], device)


class CheckpointManager:
    """Writes, lists, validates, prunes and loads the checkpoints of one output_dir."""

    def __init__(self, out_dir: Path, keep_last: int, echo: Callable[[str], None] = print) -> None:
        self.out = Path(out_dir)
        self.keep_last = keep_last
        self.echo = echo

    # -- listing and validation

    def checkpoints(self) -> list[Path]:
        """checkpoint-<step> directories, newest (highest step) first."""
        if not self.out.is_dir():
            return []
        found = [p for p in self.out.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(found, key=checkpoint_step, reverse=True)

    @staticmethod
    def validate(path: Path) -> Checkpoint:
        """Check the manifest, every file's size and SHA-256, and the JSON parts; raise naming the file."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path}: missing (the checkpoint was never completed)")
        try:
            step, files, sharded = _read_manifest(manifest_path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise CheckpointError(f"{manifest_path}: unreadable ({exc})") from None
        required = REQUIRED_SHARDED if sharded else REQUIRED
        for name in sorted({*required, *(p.name for p in path.iterdir() if p.name != MANIFEST)}):
            if name not in files:  # every file is verified before it is read: one not listed is not trusted
                raise CheckpointError(f"{path / name}: not listed in {MANIFEST}")
        if sharded and not any(_SHARD.match(name) for name in files):
            raise CheckpointError(f"{manifest_path}: a sharded checkpoint that lists no shard file")
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing")
            size, sha256 = entry
            if file.stat().st_size != size:
                raise CheckpointError(
                    f"{file}: {file.stat().st_size} bytes, the manifest says {size} (truncated or modified)")
            if _sha256(file) != sha256:
                raise CheckpointError(f"{file}: SHA-256 does not match the manifest (modified or damaged)")
        parts = {}
        for name in ("state.json", "config.json"):
            try:
                parts[name] = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path / name}: not valid JSON ({exc})") from None
            if not isinstance(parts[name], dict):
                raise CheckpointError(f"{path / name}: a JSON {type(parts[name]).__name__}, not an object")
        return Checkpoint(path, step, parts["state.json"], parts["config.json"], sharded)

    def newest_valid(self, before: int | None = None, quiet: bool = False) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that validates (optionally with step < before), and why newer ones did not."""
        problems = []
        for path in self.checkpoints():
            if before is not None and checkpoint_step(path) >= before:
                continue
            try:
                ckpt = self.validate(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                if not quiet:
                    self.echo(f"checkpoint {path.name} is not usable: {exc}")
                continue
            return ckpt, problems
        return None, problems

    # -- writing

    def clean_partial(self) -> list[Path]:
        """Remove what a killed save left behind: temporary directories never renamed into place, and the
        replaced copy of a re-saved step (`.old-`) if it died between the two renames."""
        removed = []
        if self.out.is_dir():
            for p in self.out.iterdir():
                if p.is_dir() and p.name.startswith(".checkpoint-") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for checkpoint-<step>, for the shards every process writes."""
        tmp = self.out / f".checkpoint-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def save(self, step: int, named: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
             state: dict, config: dict, metrics_file: Path,
             write_extra: Callable[[Path], None] | None = None,
             more_rng: dict[str, torch.Tensor] | None = None, shards_in: Path | None = None) -> Path:
        """Write checkpoint-<step> atomically. On any failure the temporary directory is removed, an
        existing checkpoint of the same step is left as it was, and CheckpointError says why.
        more_rng: the other processes' generator states, stored beside this one's. shards_in: the
        directory from `begin` where every process has written its shards (weights and optimizer state)."""
        final = self.out / f"checkpoint-{step}"
        tmp = shards_in or self.out / f".checkpoint-{step}.tmp-{os.getpid()}"
        current = "the temporary directory"
        try:
            if shards_in is None:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            rng_json, rng_tensors = capture_rng()
            rng_tensors.update(more_rng or {})
            opt_tensors, opt_plain = optimizer_tensors(optimizer, named) if shards_in is None else ({}, {})
            full_state = {**state, "step": step, "rng": rng_json, "optimizer_plain": opt_plain}
            writers: list[tuple[str, Callable[[Path], None]]] = [] if shards_in else [
                ("trainable.safetensors", lambda f: save_file(
                    {n: p.detach().to("cpu").contiguous() for n, p in named.items()}, str(f))),
                ("optimizer.safetensors", lambda f: save_file(opt_tensors, str(f))),
            ]
            writers += [
                ("rng.safetensors", lambda f: save_file(rng_tensors, str(f))),
                ("state.json", lambda f: _write_json(f, full_state)),
                ("config.json", lambda f: _write_json(f, config)),
                ("metrics.jsonl", lambda f: shutil.copyfile(metrics_file, f) if metrics_file.is_file()
                 else f.write_text("")),
            ]
            for name, write in writers:
                current = name
                write(tmp / name)
            if write_extra is not None:
                current = "adapter files"
                write_extra(tmp)
            files = {}
            for f in sorted(tmp.iterdir()):
                current = f.name
                _fsync(f)
                files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
            current = MANIFEST
            _write_json(tmp / MANIFEST, {"format": FORMAT_SHARDED if shards_in else FORMAT, "step": step,
                                         "files": files})
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            current = "the rename into place"
            if final.exists():  # re-saving a step (after a rollback or a resume): swap, then drop the old one
                old = self.out / f".checkpoint-{step}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync(self.out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            newest, _ = self.newest_valid(quiet=True)
            kept = f"{newest.path.name} is intact" if newest else "no earlier checkpoint exists"
            raise CheckpointError(
                f"{final}: could not write {current} ({exc.strerror or exc}); {kept}. Training stopped so it "
                "does not go on without a checkpoint; free space and resume with resume=auto"
            ) from None
        except BaseException:  # KeyboardInterrupt (second Ctrl-C) included: never leave half a checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def prune(self) -> list[Path]:
        """Delete all but the newest keep_last checkpoints and the one with the best held-out loss."""
        paths = self.checkpoints()
        keep = set(paths[: self.keep_last])
        scored = []
        for p in paths:
            try:
                loss = json.loads((p / "state.json").read_text()).get("eval_loss")
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(loss, (int, float)):
                scored.append((loss, -checkpoint_step(p), p))
        if scored:
            keep.add(min(scored)[2])
        removed = [p for p in paths if p not in keep]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed

    def set_aside(self, path: Path, why: str) -> Path:
        """Rename a checkpoint so it is no longer picked (nothing is deleted): checkpoint-8 -> checkpoint-8.<why>."""
        target = path.with_name(f"{path.name}.{why}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.{why}{n}")
        os.replace(path, target)
        return target
