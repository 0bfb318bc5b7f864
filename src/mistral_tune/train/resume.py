"""Resuming and rolling back: which checkpoint a run continues from, whether its config and data may
continue it, what happens to checkpoints newer than it, and the bad-step guard's roll-back."""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path

from pydantic import TypeAdapter

from ..config import Config
from ..errors import CheckpointError, ConfigError, TrainingHalted
from .checkpoint import MANIFEST, Checkpoint, CheckpointManager, checkpoint_step
from .guard import StepGuard
from .logs import MetricsLog
from .runtime import Runtime


def roll_back(guard: StepGuard, ckpts: CheckpointManager, named, optimizer, step: int, log: MetricsLog,
               out: Path, echo, rt: Runtime) -> None:
    """Back to the newest valid checkpoint written before the bad streak, with a lower learning rate; the
    data position is kept, so the stretch of data that caused the streak is not met again. Rank 0 picks
    the checkpoint; every process loads it."""
    target = None
    if guard.may_roll_back:
        def newest() -> str | None:
            found, _ = ckpts.newest_valid(before=guard.streak_start, quiet=True)
            return str(found.path) if found else None

        path = rt.on_main(newest)
        target = CheckpointManager.validate(Path(path)) if path else None
    if target is None:
        why = (f"stopped at step {step} after {guard.consecutive} bad steps in a row: "
               + (f"{guard.rollbacks} rollback(s) did not help (bad_step_max_rollbacks: {guard.max_rollbacks})"
                  if not guard.may_roll_back else "no checkpoint from before them to roll back to (set save_steps)"))
        report = guard.report(why)
        if log.enabled:
            details = {"report": report, "events": guard.events}
            (out / "guard_report.json").write_text(json.dumps(details, indent=1) + "\n")
            report += f"; details in {out / 'guard_report.json'}"
        raise TrainingHalted(report)
    target.load_weights(named)
    target.load_optimizer(optimizer, named)
    guard.rolled_back(step, target.step)
    echo(f"step {step}: {guard.rollback_after} bad steps in a row; rolled back to {target.path.name} "
         f"(weights and optimizer state), learning rate now x{guard.lr_scale:g}")
    log.event({"step": step, "event": "rollback", "to_checkpoint": target.path.name, "lr_scale": guard.lr_scale})


def set_aside_newer(ckpts: CheckpointManager, resumed: Checkpoint, echo) -> None:
    """Checkpoints newer than the one resumed from belong to a future this run will not have (or are
    damaged): rename them so they are neither resumed from nor counted when pruning. Nothing is deleted."""
    for path in ckpts.checkpoints():
        if path.resolve() == resumed.path.resolve() or checkpoint_step(path) <= resumed.step:
            continue
        try:
            CheckpointManager.validate(path)
            why = "superseded"
        except CheckpointError:
            why = "corrupt"
        echo(f"{path.name} is newer than {resumed.path.name}; renamed to {ckpts.set_aside(path, why).name}")


def resume_checkpoint(cfg: Config, ckpts: CheckpointManager, fingerprint: str, force: bool, rt: Runtime,
                       echo) -> Checkpoint | None:
    """The checkpoint to resume from, found and checked against the run by rank 0, opened by every process."""
    found: list[Checkpoint] = []

    def find() -> str | None:
        ckpt = find_resume_checkpoint(cfg, ckpts, echo)
        if ckpt is None:
            return None
        check_resume_config(ckpt, cfg, fingerprint, force)
        found.append(ckpt)
        return str(ckpt.path)

    path = rt.on_main(find)
    if found or not path:
        return found[0] if found else None
    return CheckpointManager.validate(Path(path))


def find_resume_checkpoint(cfg: Config, ckpts: CheckpointManager, echo) -> Checkpoint | None:
    """The checkpoint `resume` names: auto -> the newest valid one in output_dir (None when there is
    none at all), a checkpoint directory -> it, a run directory -> its newest valid one."""
    if cfg.resume == "auto":
        if not ckpts.checkpoints():
            echo(f"resume: auto: no checkpoint in {ckpts.out}; starting from step 0")
            return None
        ckpt, problems = ckpts.newest_valid()
        if ckpt is None:
            raise CheckpointError(f"resume: auto: no usable checkpoint in {ckpts.out}: " + "; ".join(problems))
        if problems:
            echo(f"resume: auto: falling back to {ckpt.path.name}, the newest valid checkpoint")
        return ckpt
    path = Path(cfg.resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume: {path} does not exist")
    if checkpoint_step(path) is not None or (path / MANIFEST).exists():
        return CheckpointManager.validate(path)
    ckpt, problems = CheckpointManager(path, 1, echo).newest_valid()
    if ckpt is None:
        why = (": " + "; ".join(problems)) if problems else ""
        raise CheckpointError(f"resume: {path}: no usable checkpoint{why}")
    return ckpt


# Keys that change how a run is observed or how long it lasts, not the steps it takes. --force accepts
# changes to these only. (max_steps and num_epochs also reshape the learning-rate schedule after the
# resume point; that is the point of changing them.)
SAFE_TO_CHANGE = frozenset({
    "logging_steps", "eval_steps", "eval", "save_steps", "save_total_limit", "max_steps", "num_epochs",
    "auto_micro_batch", "bad_step_zscore", "bad_step_window", "bad_step_rollback_after", "bad_step_lr_factor",
    "bad_step_max_rollbacks", "overlap_gradient_sync", "fsdp_reshard_after_forward", "report_to",
    "mlflow_tracking_uri", "mlflow_experiment_name", "wandb_project", "wandb_entity", "wandb_group", "wandb_tags",
})


# Where the run lives and how it was started say nothing about the steps it takes (a run directory may be moved).
_NOT_COMPARED = frozenset({"resume", "overwrite_output_dir", "output_dir"})


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) of each key whose value differs. A key the saved config lacks (added to the
    config since that run) holds its default there: unchanged when the new value is the default too."""
    keys = sorted((set(old) | set(new)) - _NOT_COMPARED)
    return [(k, old.get(k, "(absent)"), new.get(k, "(absent)")) for k in keys
            if (old[k] if k in old else _default(k)) != new.get(k)]


def _default(key: str) -> object:
    """A config key's default as the saved config (JSON) would hold it; None for a key without one."""
    field = Config.model_fields.get(key)
    if field is None or field.is_required():
        return None
    return TypeAdapter(field.annotation).dump_python(field.get_default(call_default_factory=True), mode="json")


def check_resume_config(ckpt: Checkpoint, cfg: Config, fingerprint: str, force: bool) -> None:
    """Refuse to resume under a different config (or data) unless forced, and then only for safe keys."""
    changes = config_changes(ckpt.config, cfg.model_dump(mode="json"))
    if ckpt.state.get("data_fingerprint") != fingerprint:
        changes.append(("training data", "the checkpoint's", "different tokenized samples"))
    if not changes:
        return
    listing = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)
    safe = ", ".join(sorted(SAFE_TO_CHANGE))
    unsafe = [k for k, _, _ in changes if k not in SAFE_TO_CHANGE]
    where = ckpt.path / "config.json"
    if not force:
        raise ConfigError(f"{where}: the run's config differs from the checkpoint's: {listing}. Resume with the "
                          f"checkpoint's values, or pass --force to accept changes to {safe}")
    if unsafe:
        raise ConfigError(f"{where}: --force accepts changes only to {safe}; these "
                          f"cannot change in a resumed run: {', '.join(unsafe)} ({listing})")


def data_fingerprint(samples) -> str:
    """SHA-256 over the tokenized training samples: a resumed run must see the same data."""
    h = hashlib.sha256()
    for s in samples:
        h.update(array("q", s.tokens).tobytes())
        h.update(array("q", s.labels).tobytes())
        h.update(b"|")
    return h.hexdigest()

