"""Memory of the current process from /proc/self/status, for the benchmarks (MiB)."""

from __future__ import annotations


def proc_status() -> dict[str, float]:
    """VmRSS (current) and VmHWM (peak) of this process in MiB; empty where /proc is missing."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return out
