"""Patch assembly as one batched box copy: a piece table, its numpy executor and its CUDA kernel.

A step's patches are copied from decoded chunks, one *piece* per (patch channel x chunk it
overlaps). The table says, per piece, which source and destination arrays, the element offsets in
them, the extent (Z, Y, X) and the Z and Y strides (X is contiguous on both sides). It is built
once, vectorised, here; the numpy executor (the CPU cache, and the tests' stand-in for cupy) and
the CUDA kernel (the GPU cache: one launch per step) read the same table, so the CPU tests check
the index arithmetic the GPU runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

#: columns of a piece table (int64): source array, offset in it (elements), destination array and
#: offset, extent (Z, Y, X), source Z and Y strides, destination Z and Y strides (elements)
SRC, SRC_OFF, DST, DST_OFF, NZ, NY, NX, SRC_SZ, SRC_SY, DST_SZ, DST_SY = range(11)
#: columns of the kernel's table: byte addresses instead of (array, offset), then extent and strides
ADDRESS_COLUMNS = 9


def piece_table(
    chunk_shapes: np.ndarray,
    chunk: np.ndarray,
    src: np.ndarray,
    out: np.ndarray,
    out_row: np.ndarray,
    channel: np.ndarray,
    dst: np.ndarray,
    out_shapes: np.ndarray,
) -> np.ndarray:
    """The (P, 11) table of a step's pieces.

    chunk_shapes: (N, 5) TCZYX shape of each source chunk; chunk: (P,) the piece's chunk;
    src: (P, 8) (t, c, z0, z1, y0, y1, x0, x1) inside the chunk; out / out_row / channel: (P,)
    destination buffer, its sample row and channel; dst: (P, 6) (z0, z1, y0, y1, x0, x1) inside the
    patch; out_shapes: (G, 5) (samples, C, Z, Y, X) of each destination buffer (C-contiguous).
    """
    shape = chunk_shapes[chunk]
    s_x = np.ones(len(chunk), np.int64)
    s_y = shape[:, 4]
    s_z = s_y * shape[:, 3]
    s_c = s_z * shape[:, 2]
    s_t = s_c * shape[:, 1]
    o = out_shapes[out]
    d_y = o[:, 4]
    d_z = d_y * o[:, 3]
    d_c = d_z * o[:, 2]
    d_row = d_c * o[:, 1]
    table = np.empty((len(chunk), 11), np.int64)
    table[:, SRC] = chunk
    table[:, SRC_OFF] = src[:, 0] * s_t + src[:, 1] * s_c + src[:, 2] * s_z + src[:, 4] * s_y + src[:, 6] * s_x
    table[:, DST] = out
    table[:, DST_OFF] = out_row * d_row + channel * d_c + dst[:, 0] * d_z + dst[:, 2] * d_y + dst[:, 4]
    table[:, NZ] = dst[:, 1] - dst[:, 0]
    table[:, NY] = dst[:, 3] - dst[:, 2]
    table[:, NX] = dst[:, 5] - dst[:, 4]
    table[:, SRC_SZ], table[:, SRC_SY] = s_z, s_y
    table[:, DST_SZ], table[:, DST_SY] = d_z, d_y
    return table


def copy_pieces(table: np.ndarray, sources: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> None:
    """Execute a piece table with numpy (contiguous arrays, one dtype): every piece's box copy."""
    flat_src = [a.reshape(-1) for a in sources]
    flat_out = [a.reshape(-1) for a in outs]
    for row in table.tolist():
        s, d = flat_src[row[SRC]], flat_out[row[DST]]
        item = s.itemsize
        extent = (row[NZ], row[NY], row[NX])
        view_s = as_strided(s[row[SRC_OFF]:], extent, (row[SRC_SZ] * item, row[SRC_SY] * item, item), writeable=False)
        view_d = as_strided(d[row[DST_OFF]:], extent, (row[DST_SZ] * item, row[DST_SY] * item, item))
        view_d[...] = view_s


def address_table(table: np.ndarray, src_addresses: np.ndarray, out_addresses: np.ndarray, itemsize: int) -> np.ndarray:
    """The kernel's (P, 9) table: source and destination byte addresses, extent, strides."""
    k = np.empty((len(table), ADDRESS_COLUMNS), np.int64)
    k[:, 0] = src_addresses[table[:, SRC]] + table[:, SRC_OFF] * itemsize
    k[:, 1] = out_addresses[table[:, DST]] + table[:, DST_OFF] * itemsize
    k[:, 2:] = table[:, NZ:]
    return k


def launch_shape(table: np.ndarray, threads: int = 256, per_thread: int = 4) -> tuple[tuple[int, int], tuple[int]]:
    """(grid, block) of the copy kernel: one grid row per piece, enough columns for the largest piece."""
    largest = int(np.max(table[:, NZ] * table[:, NY] * table[:, NX])) if len(table) else 1
    columns = min(65535, max(1, -(-largest // (threads * per_thread))))
    return (max(1, len(table)), columns), (threads,)


#: one kernel per element size; a piece is a grid row (blockIdx.x), its elements spread over the
#: grid's columns and the block's threads; (z, y, x) from the flat element index, X contiguous
KERNEL_SOURCE = r"""
#define COPY_PIECES(NAME, T)                                                                       \
extern "C" __global__ void NAME(const long long* table, const long long n_pieces) {              \
    for (long long p = blockIdx.x; p < n_pieces; p += gridDim.x) {                               \
        const long long* row = table + p * 9;                                                    \
        const T* src = (const T*)row[0];                                                         \
        T* dst = (T*)row[1];                                                                     \
        const long long ny = row[3], nx = row[4], total = row[2] * ny * nx;                       \
        const long long step = (long long)gridDim.y * blockDim.x;                                \
        for (long long i = (long long)blockIdx.y * blockDim.x + threadIdx.x; i < total; i += step) { \
            const long long x = i % nx, yz = i / nx, y = yz % ny, z = yz / ny;                    \
            dst[z * row[7] + y * row[8] + x] = src[z * row[5] + y * row[6] + x];                  \
        }                                                                                        \
    }                                                                                            \
}
COPY_PIECES(copy_pieces_1, unsigned char)
COPY_PIECES(copy_pieces_2, unsigned short)
COPY_PIECES(copy_pieces_4, unsigned int)
COPY_PIECES(copy_pieces_8, unsigned long long)
"""


def kernel_name(itemsize: int) -> str:
    """The copy kernel for elements of `itemsize` bytes."""
    if itemsize not in (1, 2, 4, 8):
        raise ValueError(f"no copy kernel for {itemsize}-byte elements")
    return f"copy_pieces_{itemsize}"
