"""Stop requests: SIGTERM or SIGINT asks the loop to finish its step, checkpoint and exit; a second
Ctrl-C stops at once (the checkpoint writer removes its temporary directory on the way out). The
request is heard for the whole run: while it loads (the loop then takes no step) and while the
final result is saved (which then finishes).

Repeated SIGTERMs are ignored, also after the loop: a scheduler may send several while the process
writes its checkpoint and exits, and the default action (die with 143) would turn a completed
graceful stop into a failed job. So once a stop was requested, SIGTERM stays ignored (where it had
the default action) for the rest of the process, and processes it starts later inherit that."""

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
            os.write(2, (f"\n{self.signal_name} received: finishing this step and writing a checkpoint, or "
                         "stopping before the first (Ctrl-C again to quit at once)\n").encode())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            if sig == signal.SIGTERM and self.requested and handler is signal.SIG_DFL:
                # The process is on its way out; a repeat must not kill it there (see above). SIG_IGN, not
                # a Python handler: the interpreter puts SIG_DFL back for those while it shuts down.
                handler = signal.SIG_IGN
            signal.signal(sig, handler)
        self._previous.clear()
