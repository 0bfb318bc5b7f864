"""Errors a user can cause. The CLI prints their message on one line and exits non-zero.

Exit codes of the CLI (docs/reliability.md lists them): 0 done; 2 a user error (this module's errors);
3 drift above --drift-threshold (evaluate); 4 a run stopped by the bad-step guard; 75 a run stopped on
request (SIGTERM / Ctrl-C) with its checkpoint written, to be resumed; 130 a second Ctrl-C."""

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: "try again later"; not 0, so `train && merge` does not go on


class MistralTuneError(Exception):
    """Base class: a problem with the user's input, explained in the message."""

    exit_code = 2


class ConfigError(MistralTuneError):
    """A config file, key or value is missing or wrong."""


class DataError(MistralTuneError):
    """A dataset file or record is unreadable or malformed."""


class ModelError(MistralTuneError):
    """A model path, checkpoint or tokenizer does not fit."""


class CheckpointError(MistralTuneError):
    """A checkpoint is missing, damaged, does not fit the run, or could not be written."""


class TrainingHalted(MistralTuneError):
    """The run stopped itself (bad steps that rollbacks did not cure); the message says what happened."""

    exit_code = 4


class OutOfMemory(MistralTuneError):
    """The accelerator ran out of memory; the message gives the figures and config changes that fit."""


class OutputError(MistralTuneError):
    """An output path mistral-tune may not write: it holds data mistral-tune did not create, an input,
    or the working directory (fsutil.check_target states the rule)."""


class DistributedError(MistralTuneError):
    """Another process of a multi-process run failed, was killed, or stopped answering."""
