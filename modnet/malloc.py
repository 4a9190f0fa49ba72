"""glibc malloc thresholds that keep a training step's memory mapped between steps.

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks above
``M_MMAP_THRESHOLD`` with fresh ``mmap`` pages and hands the free top of its heap
back to the kernel above ``M_TRIM_THRESHOLD``; both start at 128 KiB. A training
step or an evaluation pass allocates and frees the same activations again and
again (a conv activation of 16 images at 16x16 with 240 channels is 3.9 MB), so
with those thresholds every step maps its whole working set afresh and the
kernel zeroes each 4 KiB page on its first touch. Measured on one CPU thread
(``bench/test_malloc.py``, and the training step of ``modnet_conv_tiny`` at batch
64 over 3 tasks): about 420,000 minor page faults per step (1.6 GiB zeroed) and
2.5 s per step with glibc's thresholds, almost none (0-400 per step in the
benchmark, a few thousand in some runs) and 1.3 s with the thresholds below; an
evaluation pass over 256 images in micro-batches of 16 went from 2.2 s to 1.3 s.

``tune_malloc`` raises the mmap threshold to 32 MiB (the largest value glibc's
own dynamic threshold reaches on 64-bit systems) and the trim threshold to
1 GiB; setting them turns glibc's dynamic adjustment off. Tensors up to 32 MiB
then reuse memory already mapped. It changes no result: the same tensors, in
memory that is already mapped. The cost is memory kept by the process after it
is freed: up to 1 GiB at the top of the heap, and, as with glibc's defaults for
smaller blocks, any freed block that lies below a live one, now for blocks up to
32 MiB (one process's peak heap at most). ``release_memory`` hands every free
page back, as ``torch.cuda.empty_cache`` does for PyTorch's CUDA caching allocator.

``import modnet`` applies it once, before the caller's tensors fill the heap:
set later, it helped in one measurement (set after building a model and data)
and left two thirds of the faults in another (set after two training steps),
as the heap's layout decides. ``MODNET_TUNE_MALLOC=0`` (or ``false``, ``no``,
``off``) in the environment before the import keeps glibc's thresholds; unset,
empty, ``1``, ``true``, ``yes`` or ``on`` tune them, and any other value warns and
tunes. Other C libraries (macOS, Windows, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import warnings

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30

ENV = "MODNET_TUNE_MALLOC"
_tuned = False  # whether a call has set both thresholds in this process
OFF = ("0", "false", "no", "off")
ON = ("", "1", "true", "yes", "on")


def _wanted() -> bool:
    """Whether ``MODNET_TUNE_MALLOC`` asks for the thresholds (warns on other values)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in OFF:
        return False
    if value not in ON:
        warnings.warn(
            f"{ENV}={os.environ[ENV]!r} is neither on ({', '.join(ON[1:])}) nor off "
            f"({', '.join(OFF)}): tuning malloc; set {ENV}=0 to keep glibc's thresholds",
            stacklevel=3,
        )
    return True


def _glibc():
    """The process's glibc (``ctypes.CDLL``), or None under another C library."""
    try:  # glibc answers "glibc 2.36"; other C libraries have no such name
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL(None)
    except (AttributeError, ValueError, OSError):
        return None


def tune_malloc() -> bool:
    """Sets glibc's mmap and trim thresholds for PyTorch's CPU tensors (see the module).

    Process-wide and idempotent; called by ``import modnet``. There is no undo:
    ``MODNET_TUNE_MALLOC=0`` before the import is the way to keep glibc's own.

    Returns:
        Whether this call set both thresholds: False where ``MODNET_TUNE_MALLOC``
        turns it off (thresholds set by an earlier call stay), where the C library
        is not glibc, or where glibc refused a value.

    Warns:
        UserWarning: ``MODNET_TUNE_MALLOC`` is neither an on nor an off value.
    """
    if not _wanted():
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    global _tuned
    mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    done = bool(mmap and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _tuned = _tuned or done
    return done


def tuned() -> bool:
    """Whether ``tune_malloc`` has set the thresholds in this process (by ``import
    modnet`` or a later call): timings depend on it, so ``modnet bench`` records it."""
    return _tuned


def release_memory() -> bool:
    """Hands every free page of the heap back to the system (glibc's ``malloc_trim(0)``).

    For a process that goes on with little memory after a large step (a notebook
    after training): the memory ``tune_malloc`` lets the process keep, and free
    pages below live blocks, which glibc keeps whatever its thresholds.

    Returns:
        glibc's answer, true where it found free memory to consider (not a measure
        of how much went back); False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))
