"""Stop requests: SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit; a second
Ctrl-C stops at once (the checkpoint writer removes its temporary directory on the way out)."""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """A context manager that turns SIGTERM/SIGINT into a flag the training loop reads after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user wants out now
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            # os.write, not print: a handler may run in the middle of another print to the same stream.
            os.write(2, (f"\n{self.signal_name} received: finishing this step and writing a checkpoint "
                         "(Ctrl-C again to quit at once)\n").encode())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
