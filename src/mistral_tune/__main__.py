"""`python -m mistral_tune ...` (what torchrun starts: `torchrun --nproc_per_node N -m mistral_tune train c.yaml`)."""

import sys

from .cli import main

sys.exit(main())
