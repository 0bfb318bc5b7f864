"""`mistral-tune train c.yaml --gpus N`: the same run as N processes on this machine, started by
PyTorch's own launcher (torch.distributed.run, i.e. torchrun --standalone). Several machines:
start torchrun on each yourself with its rendezvous flags (docs/distributed.md)."""

from __future__ import annotations

import signal

import torch

from ..errors import EXIT_STOPPED, ConfigError, DistributedError


def launch(processes: int, argv: list[str]) -> int | None:
    """Run `python -m mistral_tune *argv` in `processes` processes; raise if any failed. EXIT_STOPPED
    when the run stopped on request (rank 0 exited with it; the others may have been ended with it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        raise ConfigError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} GPU(s)")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={processes}", "-m", "mistral_tune", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        if 0 in exc.failures and exc.failures[0].exitcode == EXIT_STOPPED:
            return EXIT_STOPPED
        failed = ", ".join(f"rank {rank} (" + (f"killed by {signal.Signals(-f.exitcode).name}" if f.exitcode < 0
                                               else f"exit code {f.exitcode}") + ")"
                           for rank, f in sorted(exc.failures.items()))
        raise DistributedError(f"{len(exc.failures)} of {processes} process(es) failed: {failed}; "
                               "each one's message is above") from None
