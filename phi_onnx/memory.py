"""Give back the pages of weight files that onnxruntime no longer reads once its sessions are loaded.

onnxruntime maps each external weight (``*.onnx.data``) into memory, reads it once to build its packed copy (the
int4/int8 GEMM layouts), and keeps the mapping. The pages it read stay in the process's resident set: on the full-size
CPU int4 folder, 5.7 GB of file pages beside the 6.5 GB of packed weights, so RSS is twice the folder for no use.
:func:`release_mapped_weights` tells the kernel this process no longer needs them (``madvise(MADV_DONTNEED)``); a page
read again later (an embedding row, a weight that was not packed) comes back from the page cache on its own.

Only private mappings of the folder's ``.data`` files that were never written (no anonymous, copy-on-write pages) are
released, so nothing onnxruntime holds changes: their contents are the file's. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import re
import sys
from pathlib import Path

_MADV_DONTNEED = 4
_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def release_mapped_weights(folder: Path) -> int:
    """Drop this process's resident pages of ``folder``'s weight files (see the module doc). Returns the bytes."""
    if not sys.platform.startswith("linux"):
        return 0
    try:  # the files as the kernel names them: a Hub cache's folder holds links to its blobs
        files = {str(p.resolve()) for p in folder.iterdir() if p.name.endswith(".data") and p.is_file()}
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
            regions = list(_weight_regions(smaps, files))
    except OSError:
        return 0
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, end, resident in regions:
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            released += resident
    return released


def _weight_regions(lines, files: set[str]):
    """(start, end, resident bytes) of each never-written private mapping of one of ``files``."""
    current, resident = None, 0
    for line in lines:
        head = _RANGE.match(line)
        if head:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) > 5 else ""
            private = len(fields) > 1 and fields[1].endswith("p")
            wanted = private and path in files
            current = (int(head.group(1), 16), int(head.group(2), 16)) if wanted else None
        elif current is not None and line.startswith("Rss:"):
            resident = int(line.split()[1]) * 1024
        elif current is not None and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0 and resident:
                yield (*current, resident)
            current = None


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
