"""Runs several trainings in one torchrun launch (one process group), so multi-process tests pay the
start-up of N Python processes once: `torchrun ... dist_worker.py RESULTS.json CONFIG.yaml[@FAULTS] ...`.
FAULTS sets the fault injector for that run (e.g. `1:scale,3:nan`). Rank 0 writes RESULTS.json:
{config path: "ok" or the error message}."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from mistral_tune.config import load_config
from mistral_tune.errors import MistralTuneError
from mistral_tune.train.faults import FAULTS_ENV
from mistral_tune.train.loop import train


def main(results_path: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for run in runs:
        path, _, faults = run.partition("@")
        os.environ[FAULTS_ENV] = faults
        try:
            train(load_config(path), echo=lambda *_: None)
            results[path] = "ok"
        except MistralTuneError as exc:
            results[path] = str(exc)
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
