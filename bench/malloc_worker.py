"""Worker of ``test_malloc.py``: times steps on request, with or without ``tune_malloc``.

Started with ``MODNET_TUNE_MALLOC`` set to ``1`` or ``0`` (``import modnet`` reads it),
it builds ``modnet_conv_tiny`` with 3 tasks and a batch of 64 over them, then answers
each line on stdin: ``train`` runs one training step (AdamW) on the mixed batch,
``infer`` one evaluation pass over 256 images (``predict`` with its defaults:
micro-batches of 16 for this family); it writes the seconds taken and the
minor page faults, as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import timm
import torch
import torch.nn.functional as F

import modnet  # noqa: F401  (applies tune_malloc unless MODNET_TUNE_MALLOC=0)
from modnet.train.evaluate import predict

TASKS = {"a": 10, "b": 10, "c": 10}


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("modnet_conv_tiny", tasks=TASKS)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    ids = torch.arange(64) % len(TASKS)
    images = torch.randn(256, 3, 32, 32)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, task=ids), y).backward()
        optimizer.step()

    def infer() -> None:
        predict(model, images, "a")  # the library's evaluation path, its micro-batch

    steps = {"train": train, "infer": infer}
    for line in sys.stdin:
        step = steps[line.strip()]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print(json.dumps({"seconds": seconds, "faults": faults}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
