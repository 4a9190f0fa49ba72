"""Claim 3: block reuse increases accuracy without more parameters.

The same K templates used at depth L = K, 2K and 4K (routes learned) on the
CIFAR-10 subset with its standard augmentation (pad-and-crop, flips), against a
plain network of K blocks (K = L, identity route). Every variant has the block
shape of the converged pool (``experiments/configs/converged_pool.yaml``).
Parameters barely change with L (only the route grows); compute grows with L.
A finished variant in ``--out`` is read back, not retrained, so an interrupted
run continues where it stopped; ``--out/options.json`` records the options the
variants are trained with, and other options (``--quick``, ``--epochs``,
``--train-limit``) into the same ``--out`` are refused before any work.

    python experiments/reuse.py --data-root ../shared/data --out runs/experiments/reuse
    python experiments/reuse.py --quick
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from statistics import mean

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    QUICK_MODEL,
    base_config,
    cell,
    check_options,
    command_line,
    markdown_table,
    parser,
    seeds,
    write_results,
)
from modnet import io  # noqa: E402
from modnet.train import train  # noqa: E402

# The converged pool's block shape (experiments/configs/converged_pool.yaml).
BLOCK = dict(width=32, exp_ratio=4.0, img_size=32, stem_stride=4)
FULL = dict(
    model="modnet_conv_tiny",
    tasks=["cifar10"],
    epochs=12,
    train_limit=None,
    test_limit=None,
    batch_size=64,
    augment=True,
)
QUICK = dict(
    model="modnet_conv_tiny",
    tasks=["synth_shape"],
    epochs=2,
    train_limit=320,
    test_limit=96,
    batch_size=32,
    lr=1e-2,
    route_lr=5e-2,
)


def variants(quick: bool) -> dict[str, dict]:
    k = 2 if quick else 4
    base = (
        {key: v for key, v in QUICK_MODEL.items() if key not in ("depth", "num_templates")}
        if quick
        else dict(BLOCK)
    )
    return {
        f"plain, {k} blocks (L = K = {k})": dict(base, num_templates=k, depth=k, route="hard"),
        f"K = {k}, L = {k}": dict(base, num_templates=k, depth=k),
        f"K = {k}, L = {2 * k}": dict(base, num_templates=k, depth=2 * k),
        f"K = {k}, L = {4 * k}": dict(base, num_templates=k, depth=4 * k),
    }


def inference_macs(model, task: str) -> int:
    """Multiply-accumulates of one image through the task's baked-in network."""
    net = model.export(task).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *net.input_size))
    return counter.get_total_flops() // 2


def options(config, quick: bool) -> dict:
    """What the variants' results depend on, besides the seed (one cell per seed)."""
    values = {k: v for k, v in config.result_options().items() if k not in ("seed", "model_kwargs")}
    return dict(values, variants=variants(quick))


def _train_or_read(config, run_dir: Path):
    """The variant's model, test accuracy and training seconds: read back when finished."""
    timing = run_dir / "seconds.txt"
    if "train" in io.read_results(run_dir) and timing.is_file():
        model, _ = io.load_model(run_dir)
        return model, dict(io.read_results(run_dir)["train"]["accuracy"]), float(timing.read_text())
    started = time.perf_counter()
    result = train(config, run_dir, overwrite=True)
    seconds = time.perf_counter() - started
    io.atomic_write_text(timing, f"{seconds!r}\n")
    return result.model, result.accuracy, seconds


def main(argv=None) -> dict:
    p = parser("Claim 3: block reuse without more parameters", "runs/experiments/reuse")
    args = p.parse_args(argv)
    out = Path(args.out)
    finished = any(out.glob("seed*/v*/seconds.txt"))
    check_options(out / "options.json", options(base_config(args, FULL, QUICK), args.quick),
                  cached=finished)  # fmt: skip
    accuracy: dict[str, list[float]] = {}
    params, macs, wall = {}, {}, {}
    for seed in seeds(args):
        for index, (name, model_kwargs) in enumerate(variants(args.quick).items()):
            config = base_config(args, FULL, QUICK)
            config.seed, config.model_kwargs = seed, model_kwargs
            task = config.tasks[0]
            model, task_accuracy, seconds = _train_or_read(
                config, out / f"seed{seed}" / f"v{index}"
            )
            accuracy.setdefault(name, []).append(task_accuracy[task])
            wall.setdefault(name, []).append(seconds)
            params[name] = sum(p.numel() for p in model.parameters())
            macs[name] = inference_macs(model, task)
            print(f"{name}, seed {seed}: {100 * task_accuracy[task]:.1f} % ({seconds:.0f} s)")
    rows = [
        [n, cell(accuracy[n]), f"{params[n]:,}", f"{macs[n] / 1e6:.1f}", f"{mean(wall[n]):.0f}"]
        for n in accuracy
    ]
    table = markdown_table(
        ["model", "accuracy (%)", "parameters", "MMACs / image", "training time (s)"], rows
    )
    task = (QUICK if args.quick else FULL)["tasks"][0]
    sections = [
        f"## Block reuse on `{task}`, mean ± std over seeds {seeds(args)}",
        table,
        "MACs are those of the task's baked-in network (what inference runs); a soft route "
        "adds one (L x K) @ (K x P) weight mix per forward, shared by the whole batch.",
    ]
    command = command_line(__file__, argv)
    data = dict(
        accuracy=accuracy, params=params, macs=macs, seconds=wall, seeds=seeds(args), task=task
    )
    write_results(out, "Block reuse without more parameters", sections, data, command)
    print(table)
    return data


if __name__ == "__main__":
    main()
