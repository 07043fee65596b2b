"""Whole-page copies by row, for HostSwap's staging buffer (CUDA C++ through CuPy's NVRTC).

    copy_pages(src_ptr, dst_ptr, src_rows_ptr, dst_rows_ptr, num_pages, page_bytes, stream)

copies page ``src_rows[i]`` of the page-major array at ``src_ptr`` to page ``dst_rows[i]`` of the
one at ``dst_ptr`` for i < num_pages (a row pointer of 0 means the identity: row i). Rows are
int64. They may live in pinned host memory: with unified addressing a kernel reads pinned memory
through its host address, so a caller's page ids need no upload (one 8-byte read a page and block).

HostSwap (pagemem.swap) receives this function as ``HostSwap(pool, ..., copy_kernel=copy_pages)``
and its gather path then gathers a swap-out's scattered pool pages into the staging buffer with
one launch (rows: the page ids, written to a reused pinned buffer; destination: the identity)
ahead of its device-to-host copies, and scatters a swap-in's staging rows back into the pool
with another. Without it the core uses CuPy's ``take`` and an indexed assignment, each fed by an
upload of the ids (DESIGN.md: the core imports no kernel; it is handed one).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

THREADS = 256
WORDS_PER_BLOCK = 8 * THREADS    # one block moves at most 8 words a thread of one page (32 KiB at 16 B)
MAX_GRID_X = 65535

_SRC = (Path(__file__).parent / "swap_copy.cu").read_text()   # CUDA C++ beside this loader
WORD_BYTES = (16, 8, 4, 2, 1)


@functools.cache
def _kernels(device: int) -> dict:
    """{word bytes: kernel} for one device (compiled once, at the first copy)."""
    import cupy as cp
    module = cp.RawModule(code=_SRC, options=("-std=c++17",))
    return {b: module.get_function(f"pagemem_copy_rows_{b}") for b in WORD_BYTES}


def word_bytes(page_bytes: int, *ptrs: int) -> int:
    """The widest word (16, 8, 4, 2 or 1 bytes) that divides ``page_bytes`` and every pointer."""
    return next(b for b in WORD_BYTES if page_bytes % b == 0 and all(p % b == 0 for p in ptrs))


def launch_shape(num_pages: int, page_bytes: int, word: int) -> tuple[tuple[int, int], int]:
    """((grid x, grid y), words a block moves of a page): a page is split over grid y so that a
    block moves at most WORDS_PER_BLOCK words; grid x covers the pages (grid-stride past 65535)."""
    words = page_bytes // word
    per_block = min(words, WORDS_PER_BLOCK)
    return (min(num_pages, MAX_GRID_X), -(-words // per_block)), per_block


def copy_pages(src_ptr: int, dst_ptr: int, src_rows_ptr: int, dst_rows_ptr: int, num_pages: int,
               page_bytes: int, stream=None) -> None:
    """Enqueue the copy of ``num_pages`` pages of ``page_bytes`` bytes on ``stream`` (a CuPy stream;
    default the current one); no sync. Reads src and the rows, writes dst only. Preconditions: every
    row names a page inside its array; src and dst pages do not overlap."""
    for name, v in (("src_ptr", src_ptr), ("dst_ptr", dst_ptr), ("src_rows_ptr", src_rows_ptr),
                    ("dst_rows_ptr", dst_rows_ptr), ("num_pages", num_pages), ("page_bytes", page_bytes)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if page_bytes < 1 or not src_ptr or not dst_ptr:
        raise ValueError(f"copy_pages needs page_bytes >= 1 and non-null arrays, got page_bytes={page_bytes}, "
                         f"src_ptr={src_ptr:#x}, dst_ptr={dst_ptr:#x}")
    if num_pages == 0:
        return
    import cupy as cp
    word = word_bytes(page_bytes, src_ptr, dst_ptr)
    grid, per_block = launch_shape(num_pages, page_bytes, word)
    kernel = _kernels(cp.cuda.Device().id)[word]
    args = (np.uint64(src_ptr), np.uint64(dst_ptr), np.uint64(src_rows_ptr), np.uint64(dst_rows_ptr),
            np.int64(num_pages), np.int64(page_bytes // word), np.int64(per_block))
    if stream is None:
        kernel(grid, (THREADS,), args)
        return
    with stream:
        kernel(grid, (THREADS,), args)
