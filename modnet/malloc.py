"""glibc malloc thresholds that keep a training step's memory mapped between steps.

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks above
``M_MMAP_THRESHOLD`` with fresh ``mmap`` pages and hands the free top of its heap
back to the kernel above ``M_TRIM_THRESHOLD``; both start at 128 KiB. A training
step or an evaluation pass allocates and frees the same activations again and
again (a conv activation of 16 images at 16x16 with 240 channels is 3.9 MB), so
with those thresholds every step maps its whole working set afresh and the
kernel zeroes each 4 KiB page on its first touch. Measured on one CPU thread
(``bench/test_malloc.py``, and the training step of ``modnet_conv_tiny`` at batch
64 over 3 tasks): about 400,000 minor page faults per step (1.6 GB zeroed) and
2.5 s per step with glibc's thresholds, no faults and 1.3 s with the thresholds
below; an evaluation pass over 256 images in micro-batches of 16 went from 2.2 s
to 1.3 s.

``tune_malloc`` raises the mmap threshold to 32 MiB (the largest value glibc's
own dynamic threshold reaches on 64-bit systems) and the trim threshold to
1 GiB, so tensors up to 32 MiB reuse memory already mapped. The cost: up to
1 GiB of freed memory can stay with the process instead of going back to the
system (PyTorch's CUDA caching allocator keeps freed GPU memory the same way).
It changes no result: the same tensors, in memory that is already mapped.

``import modnet`` applies it once, before the caller's tensors fill the heap
(set later, the heap already laid out by the default thresholds keeps faulting).
``MODNET_TUNE_MALLOC=0`` in the environment keeps glibc's thresholds. Other C
libraries (macOS, Windows, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30

ENV = "MODNET_TUNE_MALLOC"


def tune_malloc() -> bool:
    """Sets glibc's mmap and trim thresholds for PyTorch's CPU tensors (see the module).

    Process-wide and idempotent; called by ``import modnet``.

    Returns:
        Whether the thresholds are now set: False where the C library is not glibc,
        where ``MODNET_TUNE_MALLOC`` is ``0`` (or ``false``/``no``/``off``), or where
        glibc refused a value.
    """
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:  # glibc answers "glibc 2.36"; other C libraries have no such name
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
    except (AttributeError, ValueError, OSError):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mmap and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
