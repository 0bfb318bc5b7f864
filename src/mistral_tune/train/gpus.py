"""The GPUs we know: memory, dense bf16 peak and bandwidth of each, found by name. `plan` predicts
with them and the trainer's step lines divide by one GPU's peak for the MFU."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # as torch reports the device's total memory
    bf16_tflops: float  # dense bf16 tensor-core peak (vendor figure)
    bandwidth_tbs: float  # memory bandwidth, TB/s
    match: tuple[str, ...]  # all of these in the lower-cased device name, without spaces and dashes


GPUS = [
    GPU("H200", 140.4, 989.4, 4.8, ("h200",)),
    GPU("H100-PCIe", 79.6, 756.0, 2.0, ("h100", "pcie")),
    GPU("H100", 79.6, 989.4, 3.35, ("h100",)),
    GPU("A100-80GB", 79.3, 312.0, 2.04, ("a100", "80g")),
    GPU("A100-40GB", 39.4, 312.0, 1.555, ("a100",)),
    GPU("L40S", 44.4, 362.1, 0.864, ("l40s",)),
    GPU("A10", 22.1, 125.0, 0.6, ("a10",)),
    GPU("L4", 22.0, 121.0, 0.3, ("l4",)),
    GPU("RTX4090", 23.6, 165.2, 1.008, ("4090",)),
    GPU("RTX3090", 23.6, 71.0, 0.936, ("3090",)),
]


def find_gpu(name: str) -> GPU:
    """A GPU of the table by its name (case and dashes ignored) or by a device name torch reports."""
    key = name.lower().replace(" ", "").replace("-", "")
    for gpu in GPUS:
        if key == gpu.name.lower().replace("-", "") or all(m in key for m in gpu.match):
            return gpu
    raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(g.name for g in GPUS)} "
                      "(or give --memory-gib for a memory-only plan)")


def detect_gpu() -> tuple[GPU | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, ""
    name = torch.cuda.get_device_name(0)
    try:
        return find_gpu(name), name
    except ConfigError:
        return None, name

