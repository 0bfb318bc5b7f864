"""`python -m mistral_tune ...` (what torchrun starts: `torchrun --nproc_per_node N -m mistral_tune train c.yaml`)."""

import logging
import os
import sys

from .cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # A worker of several processes leaves without the interpreter's teardown: the process group is
    # destroyed by then, but the collective library's threads can still be finishing, and tearing the
    # interpreter down under them now and then aborted a finished run (SIGABRT, "terminate called
    # without an active exception"), which made torchrun report it failed. Everything the run wrote
    # is closed; flush what is buffered and go.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
