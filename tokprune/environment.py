"""What a measurement or an artifact records about where it was made: versions, device, machine load.

The one recorder of tokprune's environment. Manifests record :func:`versions`; reports and training
records add :func:`device_name` and :func:`machine` (CPU count, load average, which other processes
were busy: timings on a shared machine mean little without them); :func:`environment` is all of it.

Example::

    from tokprune.environment import environment, versions
    versions("diffusers", "onnxruntime")  # {'python': '3.11.7', 'tokprune': '0.1.0', 'torch': '2.13.0+cpu', ...}
    environment("cpu")["device_name"]     # 'cpu (x86_64, 2 cores, 2 threads)'
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import time
from typing import Any

__all__ = ["device_name", "environment", "machine", "versions"]


def _version_of(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - not installed, or a broken install whose native libraries fail to load
        return None
    return str(getattr(mod, "__version__", "unknown"))


def versions(*packages: str) -> dict[str, str | None]:
    """Python, tokprune and torch versions, then each of ``packages`` (its ``__version__``; None when it
    does not import). Keys are the names given, in that order."""
    import torch

    import tokprune

    out: dict[str, str | None] = {
        "python": platform.python_version(), "tokprune": tokprune.__version__, "torch": torch.__version__,
    }
    for name in packages:
        out[name] = _version_of(name)
    return out


def device_name(device: Any = "cpu") -> str:
    """The GPU's name for a CUDA device; for the CPU its processor, cores and torch threads."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _busiest(n: int) -> list[str]:
    """The ``n`` processes using the most CPU now (``ps``; empty where it is missing)."""
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,rss,comm,args", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    busy = []
    for line in ps.stdout.splitlines()[1:n + 1]:
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[1].isdigit():
            busy.append(f"{parts[0]}% cpu, {int(parts[1]) // 1024} MiB: {parts[3][:90]}")
    return busy


def machine(*, busiest: int = 0) -> dict[str, Any]:
    """CPU count, 1/5/15-minute load average, platform, UTC time, and with ``busiest=N`` the N busiest processes."""
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    out: dict[str, Any] = {
        "cpus": os.cpu_count(), "load_average": load, "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if busiest:
        out["busiest"] = _busiest(busiest)
    return out


def environment(device: Any = "cpu", packages: tuple[str, ...] = ("diffusers", "onnxruntime")) -> dict[str, Any]:
    """Device, torch threads, :func:`machine` and :func:`versions` of ``packages``: what a report records."""
    import torch

    return {
        "device": str(torch.device(device)), "device_name": device_name(device), "torch_threads": torch.get_num_threads(),
        **machine(), "versions": versions(*packages),
    }
