"""A numpy-backed stand-in for the part of cupy a GPU chunk cache uses, recording what it is asked to do.

Arrays are numpy arrays that know their device and a fake device address; streams, events, pinned
allocations and kernel launches are recorded with the device and stream current at the time. A
launch of the assembly kernel decodes its address table back into arrays and runs it with the
project's numpy executor, so the pixels it produces test the addresses the real kernel would read.
Installed as `sys.modules["cupy"]` by the tests (`device_arrays.import_cupy` is the seam).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from dali_pipeline import assembly


class FakeArray(np.ndarray):
    """A "device" array: numpy memory, a device id and a fake base address (whole allocations only)."""

    def __array_finalize__(self, obj: Any) -> None:
        self._device = getattr(obj, "_device", None)
        self._fake = getattr(obj, "_fake", None)
        self._address = None  # views have none: the kernel table must use whole allocations

    @property
    def device(self) -> SimpleNamespace:  # cupy's Device: .id
        return self._device

    @property
    def data(self) -> SimpleNamespace:  # cupy's MemoryPointer: .ptr
        if self._address is None:
            raise AssertionError("a device address was asked of a view, not of an allocation")
        return SimpleNamespace(ptr=self._address)

    def set(self, host: np.ndarray, stream: Any = None) -> None:
        self._fake.record_copy(self, host, stream)
        np.copyto(np.asarray(self), host)

    def get(self) -> np.ndarray:  # cupy's device-to-host copy
        return np.array(self)

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> FakeArray:
        out = self._fake.empty(self.shape, dtype)
        np.asarray(out)[...] = np.asarray(self)
        return out


@dataclass
class Event:
    fake: FakeCupy
    time: float
    stream: Any

    @property
    def done(self) -> bool:
        return self.time <= self.fake.completed

    def synchronize(self) -> None:
        self.fake.completed = max(self.fake.completed, self.time)


class Stream:
    def __init__(self, fake: FakeCupy, non_blocking: bool = False) -> None:
        self.fake, self.non_blocking = fake, non_blocking
        self.device_id = fake.current_device
        self.ptr = next(fake._addresses)
        fake.streams.append(self)

    def __enter__(self) -> Stream:
        self.fake._streams.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fake._streams.pop()

    def record(self) -> Event:
        self.fake.clock += 1.0
        event = Event(self.fake, self.fake.clock, self)
        if self.fake.events_complete:
            event.synchronize()
        return event


class Device:
    def __init__(self, fake: FakeCupy, device_id: int) -> None:
        if not 0 <= device_id < fake.device_count:
            raise RuntimeError(f"cudaErrorInvalidDevice: {device_id}")
        self.fake, self.id = fake, device_id

    def __enter__(self) -> Device:
        self.fake._devices.append(self.id)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.fake._devices.pop()


@dataclass
class Launch:
    name: str
    device: int
    stream: Any
    grid: tuple
    block: tuple
    arrays_devices: set = field(default_factory=set)


class Kernel:
    def __init__(self, fake: FakeCupy, name: str) -> None:
        self.fake, self.name = fake, name

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        fake = self.fake
        table, n = args
        assert isinstance(table, FakeArray) and int(n) == len(table)
        itemsize = int(self.name.rsplit("_", 1)[1])
        rows = np.asarray(table).astype(np.int64)
        src, src_off = fake.locate(rows[:, 0], itemsize)
        dst, dst_off = fake.locate(rows[:, 1], itemsize)
        arrays = sorted(set(src) | set(dst))
        slot = {a: i for i, a in enumerate(arrays)}
        pieces = np.empty((len(rows), 11), np.int64)
        pieces[:, assembly.SRC] = [slot[a] for a in src]
        pieces[:, assembly.SRC_OFF] = src_off
        pieces[:, assembly.DST] = [slot[a] for a in dst]
        pieces[:, assembly.DST_OFF] = dst_off
        pieces[:, assembly.NZ:] = rows[:, 2:]
        views = [np.asarray(fake._allocations[a][1]) for a in arrays]
        last = rows[:, 2:5] - 1  # the last element of each piece must lie inside its allocation
        for offsets, which, strides in ((src_off, src, rows[:, 5:7]), (dst_off, dst, rows[:, 7:9])):
            end = offsets + last[:, 0] * strides[:, 0] + last[:, 1] * strides[:, 1] + last[:, 2]
            assert (end < np.array([views[slot[a]].size for a in which])).all(), "a piece reads or writes past its array"
        assert all(v.dtype.itemsize == itemsize for v in views), "kernel element size differs from the arrays'"
        fake.launches.append(Launch(self.name, fake.current_device, fake.current_stream, grid, block,
                                    {fake._allocations[a][1].device.id for a in arrays}))
        assembly.copy_pieces(pieces, views, views)


class Module:
    def __init__(self, fake: FakeCupy, code: str) -> None:
        self.fake, self.code = fake, code
        fake.modules.append(self)

    def get_function(self, name: str) -> Kernel:
        assert f"COPY_PIECES({name}," in self.code, f"no kernel {name} in the module"
        return Kernel(self.fake, name)


class FakeCupy:
    """The stand-in module: `empty`, `RawModule`, `cuda.{Device, Stream, alloc_pinned_memory, get_elapsed_time}`."""

    __name__ = "fake_cupy"

    def __init__(self, device_count: int = 2, events_complete: bool = True) -> None:
        self.device_count = device_count
        self.events_complete = events_complete  # False: events stay pending until synchronized
        self.completed = 0.0
        self.clock = 0.0
        self._addresses = itertools.count(1 << 40, 1 << 32)
        self._devices: list[int] = []
        self._streams: list[Stream] = []
        self._allocations: dict[int, tuple[int, FakeArray]] = {}  # base address -> (nbytes, array)
        self._bases: list[int] = []
        self.streams: list[Stream] = []
        self.modules: list[Module] = []
        self.launches: list[Launch] = []
        self.allocations: list[tuple[int, Any, int]] = []  # (device, stream, nbytes)
        self.copies: list[tuple[int, Any, bool, int]] = []  # (device of the array, stream, from pinned, nbytes)
        self.pinned: list[bytearray] = []
        self.cuda = SimpleNamespace(
            Device=lambda device_id=0: Device(self, device_id),
            Stream=lambda non_blocking=False: Stream(self, non_blocking),
            alloc_pinned_memory=self._alloc_pinned,
            get_elapsed_time=lambda start, end: end.time - start.time,
        )

    @property
    def current_device(self) -> int:
        return self._devices[-1] if self._devices else 0

    @property
    def current_stream(self) -> Any:
        return self._streams[-1] if self._streams else None

    def empty(self, shape: Any, dtype: Any) -> FakeArray:
        array = np.empty(shape, dtype).view(FakeArray)
        array._device = SimpleNamespace(id=self.current_device)
        array._fake = self
        array._address = next(self._addresses)
        self._allocations[array._address] = (array.nbytes, array)
        bisect.insort(self._bases, array._address)
        self.allocations.append((self.current_device, self.current_stream, array.nbytes))
        return array

    def RawModule(self, code: str) -> Module:  # noqa: N802 (cupy's name)
        return Module(self, code)

    def _alloc_pinned(self, nbytes: int) -> bytearray:
        memory = bytearray(nbytes)
        self.pinned.append(memory)
        return memory

    def is_pinned(self, host: np.ndarray) -> bool:
        base = host
        while isinstance(base, np.ndarray):
            base = base.base
        base = base.obj if isinstance(base, memoryview) else base
        return any(base is memory for memory in self.pinned)

    def record_copy(self, array: FakeArray, host: np.ndarray, stream: Any) -> None:
        self.copies.append((array.device.id, stream, self.is_pinned(host), host.nbytes))

    def locate(self, addresses: np.ndarray, itemsize: int) -> tuple[list[int], np.ndarray]:
        """(base address of the allocation holding each address, element offset in it)."""
        bases, offsets = [], []
        for address in addresses.tolist():
            base = self._bases[bisect.bisect_right(self._bases, address) - 1]
            nbytes = self._allocations[base][0]
            assert 0 <= address - base < nbytes, "address outside every allocation"
            assert (address - base) % itemsize == 0, "misaligned address"
            bases.append(base)
            offsets.append((address - base) // itemsize)
        return bases, np.array(offsets, np.int64)
