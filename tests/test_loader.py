"""Data on disk: image folders read through a DataLoader, batches a pure function of the step."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modnet.data import ImageFiles, TrainBatches, eval_batches, load_task
from modnet.data.loader import step_keys
from modnet.errors import ConfigError
from modnet.train import MultiTaskSchedule, TrainConfig, evaluate, train
from tests.conftest import TINY_CONV, tiny_conv

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_folder(root: Path, train: int, test: int, classes: int = 4, size: int = 8) -> Path:
    """``train``/``test`` PNGs of ``size`` pixels, written quickly: at most 256 distinct
    images per split are encoded, image ``i`` is the ``i % 256``-th."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        pixels = generator.integers(0, 256, (min(count, 256), size, size, 3), dtype=np.uint8)
        encoded = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / split / f"c{i % classes}" / f"{i:06d}.png"
            path.write_bytes(encoded[i % len(encoded)])
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_folder(tmp_path_factory.mktemp("images"), train=60, test=20)


def load(folder: Path, on_disk: bool, **options):
    return load_task(f"folder:{folder}", img_size=8, in_memory_mb=0 if on_disk else None, **options)


def test_a_folder_over_the_threshold_stays_on_disk_and_reads_the_same_pixels(folder):
    memory, disk = load(folder, on_disk=False), load(folder, on_disk=True)
    assert torch.is_tensor(memory.train_x) and memory.in_memory
    assert isinstance(disk.train_x, ImageFiles) and not disk.in_memory
    assert disk.train_x.shape == memory.train_x.shape == (60, 3, 8, 8)
    assert torch.equal(disk.train_x[torch.arange(60)], memory.train_x)
    assert torch.equal(disk.test_x[3:9], memory.test_x[3:9])
    assert torch.equal(disk.train_y, memory.train_y)
    assert disk.transform["storage"] == "files" and memory.transform["storage"] == "memory"
    same = {k: v for k, v in disk.transform.items() if k != "storage"}
    assert same == {k: v for k, v in memory.transform.items() if k != "storage"}
    # the threshold is the size of the converted images: 80 images of 192 bytes
    assert load(folder, on_disk=False, train_limit=8).in_memory
    assert load_task(f"folder:{folder}", img_size=8, in_memory_mb=80 * 192 / 2**20).in_memory
    assert not load_task(f"folder:{folder}", img_size=8, in_memory_mb=79 * 192 / 2**20).in_memory


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_gives_the_in_memory_batches_in_any_step_order(folder, augment, workers):
    memory = {"f": load(folder, on_disk=False, augment=augment)}
    disk = {"f": load(folder, on_disk=True, augment=augment)}
    schedule = MultiTaskSchedule([60], batch_size=16, seed=3)
    from_memory = TrainBatches(memory, schedule, seed=5)
    from_disk = TrainBatches(disk, schedule, seed=5, workers=workers)
    for step in (0, 1, 2, 7, 3, 4):  # a jump restarts the loader at that step
        for a, b in zip(from_memory(step), from_disk(step), strict=True):
            assert torch.equal(a, b)
    from_disk.close()


def test_shares_of_steps_interleaved_as_micro_batches_read_like_memory(folder):
    memory = {"f": load(folder, on_disk=False, augment=True)}
    disk = {"f": load(folder, on_disk=True, augment=True)}
    schedule = MultiTaskSchedule([60], batch_size=16, seed=3)
    from_memory = TrainBatches(memory, schedule, seed=5)
    from_disk = TrainBatches(disk, schedule, seed=5, workers=1)
    for step in range(3):
        for shard in range(3):  # 16 samples in 3 shares: 6, 5, 5
            a, b = from_memory(step, shard, 3), from_disk(step, shard, 3)
            assert len(a[1]) == (6 if shard == 0 else 5)
            for left, right in zip(a, b, strict=True):
                assert torch.equal(left, right)
    x, y, ids = TrainBatches(memory, MultiTaskSchedule([60], batch_size=2), workers=0)(0, 2, 3)
    assert x.shape[0] == y.shape[0] == ids.shape[0] == 0  # an empty share
    from_disk.close()


def test_ranks_share_a_step_without_overlap_and_together_cover_it(folder):
    data = {"f": load(folder, on_disk=True)}
    schedule = MultiTaskSchedule([60], batch_size=16, seed=3)
    whole = {key[2:4] for key in step_keys(schedule, 2)}
    shares = [{key[2:4] for key in step_keys(schedule, 2, rank, 2)} for rank in (0, 1)]
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == whole and len(whole) == 16
    together = torch.cat([TrainBatches(data, schedule, r, 2, workers=0)(2)[1] for r in (0, 1)])
    assert sorted(together.tolist()) == sorted(
        TrainBatches(data, schedule, workers=0)(2)[1].tolist()
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_score_disjoint_test_batches_that_together_are_the_split(folder, world_size):
    for split in (load(folder, on_disk=True), load(folder, on_disk=False)):
        whole = list(eval_batches(split, 6, workers=1))
        shares = [list(eval_batches(split, 6, 1, shard=(r, world_size))) for r in range(world_size)]
        for index, (x, y) in enumerate(whole):  # batch i is the (i // W)-th of rank i % W
            mine = shares[index % world_size][index // world_size]
            assert torch.equal(mine[0], x) and torch.equal(mine[1], y)
        assert sum(len(s) for s in shares) == len(whole)


def test_a_shard_that_is_not_this_process_is_refused_before_scoring(folder):
    memory = load(folder, on_disk=False)
    for shard in [(3, 3), (-1, 2), (1, 1), (0, 0)]:
        with pytest.raises(ConfigError, match=r"0 <= rank < world_size"):
            next(eval_batches(memory, 5, shard=shard))
    model = tiny_conv(tasks={"f": 4})
    with pytest.raises(ConfigError) as error:
        evaluate(model, {"f": memory}, batch_size=5, shard=(0, 2))
    assert str(error.value) == (
        "shard=(0, 2) scores a share of the test batches, but this process is in no "
        "process group: pass its (rank, world_size), or (0, 1)"
    )


def test_evaluation_reads_test_images_on_disk_through_the_loader(folder):
    disk, memory = load(folder, on_disk=True), load(folder, on_disk=False)
    batches = list(eval_batches(disk, 6, workers=1))
    assert [len(x) for x, _ in batches] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), memory.test_x)
    model = tiny_conv(tasks={"f": 4})
    assert evaluate(model, {"f": disk}, batch_size=7, workers=1) == evaluate(
        model, {"f": memory}, batch_size=7
    )


def _config(**overrides) -> TrainConfig:
    values = dict(
        model_kwargs=TINY_CONV,
        batch_size=16,
        epochs=2,
        checkpoint_every=3,
        progress=False,
        in_memory_mb=0,
        data_workers=1,
        augment=True,
        seed=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.slow  # three trainings through loader workers: about 12 s
def test_training_from_disk_with_augmentation_resumes_bit_identically(
    folder, tmp_path, monkeypatch
):
    # drop path draws from the global RNG: the loader's iterators must not (a resumed
    # run starts its iterator mid-way, an uninterrupted run at step 0)
    kwargs = dict(TINY_CONV, drop_path_rate=0.2)
    config = _config(tasks=[f"folder:{folder}"], model_kwargs=kwargs)
    whole = train(config, tmp_path / "whole")

    from modnet.train.loop import Trainer

    step = Trainer._train_step

    def interrupted(self, index):
        if index == 5:
            raise KeyboardInterrupt
        return step(self, index)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "_train_step", step)
    resumed = train(config, tmp_path / "resumed")
    expected = whole.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.accuracy == whole.accuracy
    in_memory = train(
        _config(tasks=[f"folder:{folder}"], model_kwargs=kwargs, in_memory_mb=None),
        tmp_path / "mem",
    )
    for name, value in in_memory.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


PEAK_RSS = """
import json, resource, sys
from modnet.train import TrainConfig, train
config = TrainConfig(
    tasks=["folder:" + sys.argv[1]], model_kwargs=dict(width=8, exp_ratio=2.0, img_size=8,
    num_templates=2, depth=2), batch_size=64, epochs=1, in_memory_mb=0, data_workers=1,
    test_limit=64, progress=False, log_every=1000)
train(config, sys.argv[2])
"""
# The process's own peak is VmHWM (this program's memory since exec): ru_maxrss can
# carry the peak of the process that spawned it (here pytest's, after other tests).
REPORT_PEAKS = """
status = open("/proc/self/status").read().split("VmHWM:")[1]
own = int(status.split()[0])
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps(dict(own=own, workers=workers)))
"""


def peak_rss(script: str, *runs: list[str]) -> list[dict[str, int]]:
    """Peak RSS in KiB of ``script`` run once per argument list of ``runs``, each in its
    own process (side by side: a process's peak is its own): its own and its largest
    child's.

    ``script`` imports ``json``, ``resource`` and ``sys``; the report is appended."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script + REPORT_PEAKS, *args],
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in runs
    ]
    reports = []
    for process in processes:
        out, err = process.communicate()
        assert process.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """One epoch over 2,000 and over 20,000 images on disk: the same peak RSS within 10 %."""
    counts = (2_000, 20_000)
    runs = [
        [str(write_tiny_folder(tmp_path / f"n{n}", train=n, test=64)), str(tmp_path / f"run{n}")]
        for n in counts
    ]
    peaks = dict(zip(counts, peak_rss(PEAK_RSS, *runs), strict=True))
    print(f"peak RSS in KiB (own process, largest loader worker): {peaks}")
    for side in ("own", "workers"):
        small, large = peaks[2_000][side], peaks[20_000][side]
        assert large <= 1.1 * small, (side, peaks)
