"""What the benchmark scripts share: a free local port and how a result is printed and kept."""
from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emit(result: dict, json_path: Path | None) -> None:
    """Print the result as JSON and, when a path is given, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a figure was measured on. The same 2-core machine kind has been lent with different
    hosts: one AVX2-only AMD EPYC without native bf16 ran our bf16-activation kernels ~3.5x
    slower than the earlier hosts, so a result is only comparable with the CPU it names."""
    import torch

    from mrg_core.models.quantize import native_bf16

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg()[0]}
