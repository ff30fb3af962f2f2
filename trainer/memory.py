"""Keep freed memory in the process instead of handing it back to the kernel after every batch.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and
returns it with munmap when freed. A batch of 32 images at 640 px has activations of hundreds of
MB, so each forward pass maps them again and the kernel zeroes every page on first touch: the
evaluation of yolov5n at 640 spent 9.4 s of system time against 18 s of user time, and its loop
took 11.2-11.9 s. With mmap off and a high trim threshold the freed blocks stay in the heap and
the next batch reuses them: 2.5-3.7 s of system time, 7.6-8.0 s for the loop (A/B with
`KFYOLO_MALLOC=default` on `python -m trainer.evaluate --imgsz 640 --batch-size 32`, COCO128 val).
A training epoch at 640 went from 20.3 to 16.2 s; at 320 px, batch 16, it neither gains nor loses.

The cost is that the process keeps its peak heap until it exits, which a training or evaluation
process reaches on its first batch anyway. `KFYOLO_MALLOC=default` leaves glibc's settings alone;
other C libraries (musl, macOS) are left alone too. The settings are inherited by forked
DataLoader workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # free space at the heap top kept before any is returned (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Switch glibc's malloc to reuse freed memory (see the module docstring); True when it did."""
    if os.environ.get("KFYOLO_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
