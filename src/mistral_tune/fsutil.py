"""Writing a whole output directory so that readers see either the old one or the complete new one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_dir(final: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a fresh hidden sibling directory, then move it to `final`, replacing what
    was there. If write fails, nothing at `final` changes and the temporary directory is removed."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
