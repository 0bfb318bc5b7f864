"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


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


class OutOfMemory(MistralTuneError):
    """The accelerator ran out of memory; the message gives the figures and config changes that fit."""


class OutputError(MistralTuneError):
    """An output path mistral-tune may not write: it holds data mistral-tune did not create, an input,
    or the working directory (fsutil.check_target states the rule)."""


class DistributedError(MistralTuneError):
    """Another process of a multi-process run failed, was killed, or stopped answering."""
