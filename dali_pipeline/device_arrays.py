"""Where a chunk cache keeps its arrays: host memory (numpy) or one GPU (cupy), behind one interface.

`HostArrays` decodes chunks into recycled host buffers and assembles patches with numpy threads.
`GpuArrays` decodes chunks into pinned host staging, uploads them asynchronously on a dedicated
non-blocking stream of its own GPU (`device_id`, never the current device), and assembles each
step's patches with one kernel launch on that stream; DALI's GPU external source is given the same
stream, so it waits for the step and nothing waits for torch's stream. cupy is imported through
`import_cupy`, the seam the CPU tests replace with a numpy-backed stand-in that records devices,
streams, pinned buffers and launches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Literal

import numpy as np

from dali_pipeline.assembly import KERNEL_SOURCE, address_table, copy_pieces, kernel_name, launch_shape


def import_cupy() -> ModuleType:
    """cupy, or an ImportError naming the extra to install."""
    try:
        import cupy
    except ImportError as err:
        raise ImportError("a chunk cache on the GPU needs cupy: pip install 'dynaclr-dali[cu12]' "
                          "(or [cu13], matching your DALI)") from err
    return cupy


def device_arrays(device: Literal["cpu", "gpu"], device_id: int | None = None,
                  copy_threads: int = 1) -> HostArrays | GpuArrays:
    """The arrays of a chunk cache on `device` ("gpu" needs `device_id`)."""
    if device == "cpu":
        return HostArrays(copy_threads)
    if device != "gpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device_id is None:
        raise ValueError("a chunk cache on the GPU needs a device_id (the GPU its chunks live on)")
    return GpuArrays(device_id, import_cupy())


class HostArrays:
    """numpy arrays in host memory. Decoded chunks land in recycled buffers of evicted chunks.

    glibc would keep the freed buffers and let RSS outgrow the cache budget, so a chunk no pending
    plan reads any more (`release`) is kept for the next chunk of its shape and dtype; spares are
    never freed: the buffers ever allocated stay at the peak of cached + pinned chunks.
    """

    device = "cpu"

    def __init__(self, copy_threads: int = 1) -> None:
        self.copy_threads = max(1, int(copy_threads))
        self._copiers = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="chunk-copy") \
            if self.copy_threads > 1 else None
        self._free: dict[tuple, list[np.ndarray]] = {}
        self.buffers = {"allocated": 0, "reused": 0}

    def staging(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A recycled buffer to decode a chunk into, or None (tensorstore allocates with the step's batch)."""
        spare = self._free.get((shape, np.dtype(dtype)))
        if not spare:
            self.buffers["allocated"] += 1
            return None
        self.buffers["reused"] += 1
        return spare.pop()

    def adopt(self, decoded: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """The decoded chunk as a cache entry in the batch `dtype`: itself, or promoted into a
        recycled buffer (the decoded one is then free for the next chunk of its dtype)."""
        if decoded.dtype == dtype:
            return decoded
        promoted = self.staging(decoded.shape, dtype)
        if promoted is None:
            promoted = np.empty(decoded.shape, dtype)
        promoted[...] = decoded
        self.release(decoded)
        return promoted

    def release(self, chunk: np.ndarray) -> None:
        """Keep a chunk's buffer for the next chunk of its shape and dtype."""
        self._free.setdefault((chunk.shape, chunk.dtype), []).append(chunk)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def from_host(self, array: np.ndarray) -> np.ndarray:
        return array

    def assemble(self, table: np.ndarray, chunks: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> None:
        """Run the piece table; numpy releases the GIL while copying, so the pieces split over threads."""
        if self._copiers is None or len(table) < 2 * self.copy_threads:
            copy_pieces(table, chunks, outs)
            return
        parts = np.array_split(table, self.copy_threads)
        list(self._copiers.map(lambda part: copy_pieces(part, chunks, outs), parts))

    def begin_step(self) -> None:
        """Nothing to time on the host."""

    def end_uploads(self) -> None:
        """Nothing to time on the host."""

    def stats(self) -> dict[str, Any]:
        return {"device": "cpu", **self.buffers}


class GpuArrays:
    """cupy arrays on GPU `device_id`, every upload and kernel on one non-blocking stream of that GPU.

    Chunks are decoded into pinned host buffers (`staging`), uploaded with an asynchronous copy
    (`adopt`), and a staging buffer is reused only once the event recorded after its upload has
    passed. `assemble` is one kernel launch per step over the step's piece table (itself uploaded
    from pinned memory). CUDA events time each step's uploads and assembly; `stats()` reads them.
    """

    device = "gpu"

    def __init__(self, device_id: int, cupy: ModuleType) -> None:
        self.device_id = int(device_id)
        self.cp = cupy
        with self.cp.cuda.Device(self.device_id):
            self.stream = self.cp.cuda.Stream(non_blocking=True)
            self._kernels = self.cp.RawModule(code=KERNEL_SOURCE)
        self._pinned: dict[tuple, list[np.ndarray]] = {}
        self._in_flight: deque[tuple[Any, tuple, np.ndarray]] = deque()  # (event, key, buffer) of uploads
        self._timing: deque[tuple[Any, Any, Any]] = deque()  # (start, uploaded, assembled) events per step
        self._step_events: list = []
        self.counts = {"launches": 0, "uploads": 0, "upload_bytes": 0, "pinned_bytes": 0, "steps_timed": 0}
        self.times_ms = {"upload": 0.0, "assembly": 0.0}

    # -------------------------------------------------------------- host staging
    def _reclaim(self) -> None:
        while self._in_flight and self._in_flight[0][0].done:
            _, key, buffer = self._in_flight.popleft()
            self._pinned.setdefault(key, []).append(buffer)

    def staging(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A pinned host buffer to decode a chunk into (a free one, or newly allocated)."""
        key = (tuple(shape), np.dtype(dtype))
        self._reclaim()
        free = self._pinned.get(key)
        if free:
            return free.pop()
        nbytes = int(np.prod(shape)) * key[1].itemsize
        memory = self.cp.cuda.alloc_pinned_memory(nbytes)
        self.counts["pinned_bytes"] += nbytes
        return np.frombuffer(memory, key[1], int(np.prod(shape))).reshape(shape)

    def _upload(self, host: np.ndarray) -> Any:
        with self.cp.cuda.Device(self.device_id), self.stream:
            device = self.cp.empty(host.shape, host.dtype)
            device.set(host, stream=self.stream)
        self._in_flight.append((self.stream.record(), (host.shape, host.dtype), host))
        self.counts["uploads"] += 1
        self.counts["upload_bytes"] += host.nbytes
        return device

    def adopt(self, decoded: np.ndarray, dtype: np.dtype) -> Any:
        """The decoded (pinned) chunk uploaded asynchronously on the stream, promoted there to the batch `dtype`."""
        device = self._upload(decoded)
        if device.dtype == dtype:
            return device
        with self.cp.cuda.Device(self.device_id), self.stream:
            return device.astype(dtype)

    def release(self, chunk: Any) -> None:
        """Evicted device chunks go back to cupy's pool when the last reference drops."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        with self.cp.cuda.Device(self.device_id), self.stream:
            return self.cp.empty(shape, dtype)

    def from_host(self, array: np.ndarray) -> Any:
        """A host array on the GPU, through pinned staging (the uncached fallback's patches)."""
        pinned = self.staging(array.shape, array.dtype)
        pinned[...] = array
        return self._upload(pinned)

    # -------------------------------------------------------------- assembly
    def assemble(self, table: np.ndarray, chunks: Sequence[Any], outs: Sequence[Any]) -> None:
        """One kernel launch copies every piece of the step (`table`, see `assembly.piece_table`)."""
        itemsize = np.dtype(outs[0].dtype).itemsize
        addresses = address_table(table, np.array([c.data.ptr for c in chunks], np.int64),
                                  np.array([o.data.ptr for o in outs], np.int64), itemsize)
        device_table = self.from_host(addresses)
        grid, block = launch_shape(table)
        with self.cp.cuda.Device(self.device_id), self.stream:
            kernel = self._kernels.get_function(kernel_name(itemsize))
            kernel(grid, block, (device_table, np.int64(len(table))))
        self.counts["launches"] += 1
        self._step_events.append(self.stream.record())
        self._timing.append(tuple(self._step_events))
        self._step_events = []

    def begin_step(self) -> None:
        """Mark the start of a step's uploads on the stream (CUDA event); read the finished steps' times."""
        self._collect(wait=False)
        self._step_events = [self.stream.record()]

    def end_uploads(self) -> None:
        """Mark the end of a step's uploads on the stream (CUDA event)."""
        self._step_events.append(self.stream.record())

    def _collect(self, wait: bool) -> None:
        while self._timing and (wait or self._timing[0][-1].done):
            start, uploaded, assembled = self._timing.popleft()
            assembled.synchronize()
            self.times_ms["upload"] += self.cp.cuda.get_elapsed_time(start, uploaded)
            self.times_ms["assembly"] += self.cp.cuda.get_elapsed_time(uploaded, assembled)
            self.counts["steps_timed"] += 1

    def stats(self) -> dict[str, Any]:
        """Counts and GPU times (ms, CUDA events) of the steps so far; waits for the last step's events."""
        self._collect(wait=True)
        return {"device": "gpu", "device_id": self.device_id, **self.counts,
                **{f"{k}_ms": v for k, v in self.times_ms.items()}}
