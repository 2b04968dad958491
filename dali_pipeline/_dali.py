"""The one place that imports NVIDIA DALI, with an error that says which extra to install."""

from __future__ import annotations

from types import ModuleType

MIN_VERSION = (2, 4)
INSTALL_HINT = (
    "install the DALI extra that matches your CUDA driver: pip install 'dynaclr-dali[cu12]' "
    "(nvidia-dali-cuda120, driver >= 525) or 'dynaclr-dali[cu13]' (nvidia-dali-cuda130, driver >= 580); "
    "never both, their wheels overwrite each other"
)


def require_dali() -> ModuleType:
    """`nvidia.dali`, at least 2.4, or an ImportError naming the extras."""
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise ImportError(f"NVIDIA DALI is not installed: {INSTALL_HINT}") from err
    version = tuple(int(p) for p in dali.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise ImportError(f"NVIDIA DALI {dali.__version__} is too old (need >= 2.4): {INSTALL_HINT}")
    return dali


def gpu_count() -> int:
    """CUDA devices DALI can use (0 on a CPU-only machine)."""
    require_dali()
    import nvidia.dali.backend as backend

    return int(backend.GetCUDADeviceCount())
