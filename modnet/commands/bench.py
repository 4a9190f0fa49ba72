"""``modnet bench``: samples/s, peak memory and GMACs, optionally as a ratio to a baseline.

Follows timm's ``benchmark.py``: one row per (model, inference/train, batch size),
samples/s after warm-up, ``inference_mode`` for inference, an SGD step for
training. With ``--compare`` the baseline runs in the same rounds as modnet
(alternating), and the row carries the per-round median ratio.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .. import benchmark as bm
from .. import malloc
from ..errors import ConfigError, ModnetError
from ..factory import from_timm
from ..families import timm_family
from ..model import _head_classes
from ..options import create_model, modnet_models, timm_create
from ._options import add_model_arg_option, parse_model_args, refuse_replacing

COMPARE = {
    "timm": "the plain timm model of the same shape (from_timm: the timm model itself)",
    "export": "the task's route baked into plain blocks (ExportedNet)",
    "moe": "output mixing: all K templates run per layer, outputs mixed",
    "eager": "the same model without torch.compile (implies --compile for modnet)",
    "layout": "the same model in the other memory layout (NCHW vs channels_last)",
}
TASK = "default"
NUM_CLASSES = 1000  # --num-classes unless the user gives it or --model-arg tasks
DESCRIPTION = """\
Samples/s after warm-up (inference under inference_mode, training as one SGD
step), parameter count, GMACs per sample, peak memory and the share of the
machine's own dense-matmul FLOP/s, one row per model, mode and batch size.
Inference runs each batch in micro-batches of the family's default size (as
evaluation does), on both sides; --micro-batch 0 runs it in one pass.
With --compare, a baseline runs in the same alternating rounds and every row
carries the median per-round throughput ratio modnet/baseline."""
EXAMPLES = """\
examples:
  modnet bench --model modnet_conv_tiny --bench both --batch-size 1 8 64 --compare timm
  modnet bench --model vit_tiny_patch16_224 --model-arg img_size=32 patch_size=4 \\
      --compare timm --results-file results.csv
  modnet bench --model modnet_conv_tiny --model-arg num_templates=4 --compare moe
  modnet bench --model modnet_vit_tiny --compare eager      # torch.compile vs eager
  modnet bench --model modnet_conv_tiny --compare layout     # channels_last vs NCHW

columns of --results-file (.csv: one row per model, mode and batch size; .json: a
list of the same rows; an empty CSV cell is null in JSON):
  model, bench, device  the model, inference or train, the device
  threads               torch CPU threads (empty on CUDA)
  malloc_tuned          whether import modnet set glibc's malloc thresholds in
                        this process (False with MODNET_TUNE_MALLOC=0 or another C
                        library); CPU timings depend on it
  precision             --precision
  batch_size            samples per step
  micro_batch           inference: samples per forward pass (empty: the whole batch
                        in one pass; always empty for train)
  img_size              input height and width, pixels
  channels_last         the modnet side's layout (True: NHWC, False: NCHW)
  compile               whether the modnet side ran under torch.compile
  rounds                timed rounds per side
  matmul_gflops_per_sec the dense square matmul timed in the same rounds, GFLOP/s
  param_count_m         parameters, millions
  gmacs                 GMACs per sample (a MAC is 2 FLOPs); train: forward+backward
  samples_per_sec       samples/s (batch_size / step time)
  step_time_ms          median time of one step (one whole batch), milliseconds
  gflops_per_sec        counted FLOPs per second of the step, GFLOP/s
  flops_utilization     median per-round share of the matmul's FLOP/s, a fraction 0-1
  peak_memory_mib       peak memory of one step, MiB (2**20 bytes): resident state
                        plus the highest transient allocation; empty for a compiled
                        side (measured on eager models only); absent with --no-memory
with --compare, also:
  baseline              what modnet is compared with (see --compare)
  baseline_*            the columns above from param_count_m on, for the baseline
  ratio                 throughput modnet/baseline (samples/s), median of per-round
                        ratios (above 1: modnet faster)
  ratio_low, ratio_high the quartiles of the per-round ratios
  memory_ratio          peak memory modnet/baseline (empty if either side compiled)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput, peak memory and GMACs (optionally against timm)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        nargs="+",
        default=["modnet_conv_tiny"],
        help="modnet_* models, or timm ViT/MLP-Mixer names (measured via modnet.from_timm)",
    )
    parser.add_argument("--bench", choices=("inference", "train", "both"), default="inference")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input size (model default; or --model-arg img_size=N, not both)",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help=f"classes of the model's head (default {NUM_CLASSES}); with --model-arg "
        "tasks={name: classes} the first task is measured instead",
    )
    parser.add_argument("--precision", choices=bm.PRECISIONS, default="float32")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_true",
        default=None,
        help="NHWC layout (default: on for convolutional models, where it is faster)",
    )
    layout.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="inference: run each batch as forward passes of this many samples, both sides "
        "(default: the modnet family's, as evaluation does; 0: one pass per batch)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both sides (peak memory is measured on eager models only, so "
        "it is left empty for a compiled side, and so is memory_ratio)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per side")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side")
    parser.add_argument(
        "--min-time", type=float, default=0.2, help="seconds per side and round (>= 1 step)"
    )
    add_model_arg_option(parser, dest="model_kwargs")
    parser.add_argument(
        "--compare",
        choices=tuple(COMPARE),
        default=None,
        help="; ".join(f"{k}: {v}" for k, v in COMPARE.items()),
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="side of the square matmul that measures the machine's FLOP/s "
        "(default 2048 on CPU, 8192 on CUDA)",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="skip peak memory (no peak_memory_mib, baseline_peak_memory_mib, memory_ratio)",
    )
    parser.add_argument(
        "--results-file",
        type=Path,
        default=None,
        help=".csv or .json; an existing file (or a symbolic link, even a dangling one) "
        "is refused unless --overwrite is given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --results-file (for a symbolic link: the file it points "
        "to, keeping the link)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measures every configuration in turn and writes the rows.

    A configuration that fails (out of memory, a model that cannot run at that
    size) ends the sweep with exit code 1: one line names it (model, mode, batch
    size) and the fix, the next says where the rows measured before it went
    (``--results-file``, written all the same, or stdout).

    Returns:
        0 when every configuration was measured, 1 when one failed.

    Raises:
        ConfigError: An invalid option (before anything is measured), or a results
            file that appeared during the run: it is left as it is and the rows are
            printed on stdout instead.
    """
    device, precision, kwargs = check_options(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    benches = ("inference", "train") if args.bench == "both" else (args.bench,)
    configs = [(m, b, s) for m in args.model for b in benches for s in args.batch_size]
    rows = []
    for index, (model_name, bench, batch_size) in enumerate(configs, 1):
        label = f"[{index}/{len(configs)}] {model_name} {bench} batch {batch_size}"
        try:
            with bm.quiet_profiler():
                row = measure(args, model_name, bench, batch_size, device, precision, kwargs, label)
        except ModnetError:
            raise  # the user's to fix: one line and exit 2 (modnet.cli)
        except (ValueError, TypeError, RuntimeError, MemoryError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            print(
                f"modnet bench: {model_name} {bench} batch {batch_size} failed: {reason}: "
                "leave this configuration out (a smaller --batch-size if memory ran out) "
                "and run again",
                file=sys.stderr,
            )
            print(f"modnet bench: {save_rows(rows, args)}", file=sys.stderr)
            return 1
        rows.append(row)
        print(bm.summary_line(row), flush=True)
    if args.results_file is not None:
        print(save_rows(rows, args), file=sys.stderr)
    return 0


def save_rows(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Writes ``rows`` to ``--results-file`` (if given) and says where they went.

    Raises:
        ConfigError: The results file appeared during the run (another process wrote
            it) and ``--overwrite`` was not given: it is left as it is, and the rows
            are printed on stdout in its format so none is lost.
    """
    counted = f"{len(rows)} row{'' if len(rows) == 1 else 's'}"
    path = args.results_file
    if not rows:
        return "nothing was measured" + (f", so {path} was not written" if path else "")
    if path is None:
        return f"what was measured ({counted}) is printed above"
    try:
        check_results_file(path, args.overwrite)  # it may have appeared meanwhile
    except ConfigError as error:
        sys.stdout.write(bm.format_results(rows, path.suffix))
        sys.stdout.flush()
        raise ConfigError(
            f"{error} (it appeared while modnet bench ran and was left as it is; the rows "
            f"measured, {counted}, are printed above on stdout)"
        ) from None
    bm.write_results(rows, path)
    return f"wrote {counted} to {path}"


# ------------------------------------------------------------------------- checks


def check_options(args: argparse.Namespace) -> tuple[torch.device, bm.Precision, dict[str, Any]]:
    """Checks every option and model before anything is measured.

    Returns:
        The device, the precision and the ``--model-arg`` options.

    Raises:
        ConfigError: An option out of range, an unknown model or model option, or a
            results file that exists (without ``--overwrite``); one line naming the
            option, the value and the fix.
    """
    for size in args.batch_size:
        if size < 1:
            raise ConfigError(
                f"--batch-size {size} is not a batch size: give sizes of at least 1 "
                "(e.g. --batch-size 1 8 64)"
            )
    at_least = [
        ("--rounds", args.rounds, 1, "timed rounds per side"),
        ("--warmup", args.warmup, 0, "warm-up steps per side"),
        ("--micro-batch", args.micro_batch, 0, "samples per forward pass; 0: one pass per batch"),
        ("--threads", args.threads, 1, "torch CPU threads"),
        ("--num-classes", args.num_classes, 1, "classes of the model's head"),
        ("--img-size", args.img_size, 1, "input height and width"),
        ("--matmul-size", args.matmul_size, 1, "side of the square matmul"),
    ]
    for option, value, low, meaning in at_least:
        if value is not None and value < low:
            raise ConfigError(f"{option} must be at least {low} ({meaning}), got {value}")
    if not (math.isfinite(args.min_time) and args.min_time >= 0):
        raise ConfigError(
            f"--min-time must be a number of seconds >= 0 (0: one step per round), "
            f"got {args.min_time}"
        )
    try:
        device = bm.resolve_device(args.device)
    except RuntimeError:  # torch.device() of a name it does not know
        raise ConfigError(
            f"--device {args.device!r} is not a device: use cpu or cuda (cuda:N)"
        ) from None
    precision = bm.Precision.parse(args.precision)
    if args.results_file is not None:  # before the models are built: it costs nothing
        if args.results_file.suffix.lower() not in (".csv", ".json"):
            raise ConfigError(
                f"--results-file {args.results_file} must end in .csv or .json: the suffix "
                "picks the format"
            )
        check_results_file(args.results_file, args.overwrite)
    kwargs = parse_kwargs(args.model_kwargs)
    for name in dict.fromkeys(args.model):
        check_model(name, args, kwargs)
    return device, precision, kwargs


def check_model(name: str, args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """Checks a model name and its options by building it before anything is measured.

    A ``modnet_*`` model is built on the CPU (they are small); a timm model on the
    meta device (no memory, no initialisation), then checked for ``from_timm``.
    """
    options = model_options(args, kwargs)
    if name.startswith("modnet_"):
        model = create_model(name, options)
        if args.compare == "moe":
            try:  # output mixing needs [L, K] coefficients: a soft, isotropic route
                bm.OutputMixingNet(model, measured_task(model)).coefficients()
            except ValueError:
                given = " ".join(
                    f"{k}={kwargs[k]}" for k in ("route", "anisotropic") if k in kwargs
                )
                raise ConfigError(
                    f"--compare moe with {name} --model-arg {given}: output mixing needs one "
                    "mixing coefficient per layer and template (a soft route, not anisotropic); "
                    "leave route and anisotropic out"
                ) from None
        return
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}: give a modnet_* model ({', '.join(modnet_models())}) "
            "or a timm ViT/MLP-Mixer name such as vit_tiny_patch16_224"
        )
    with torch.device("meta"):
        model = timm_create(name, {**options, "pretrained": False})
    timm_family(model)  # ConfigError for a class from_timm cannot convert
    if args.compare == "moe":
        raise ConfigError(
            f"--compare moe with {name}: from_timm runs a timm model's blocks in order (a hard "
            "route), so there are no mixing coefficients to mix outputs with; compare a "
            "modnet_* model"
        )


def model_options(args: argparse.Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options a model is built with: ``--model-arg``, ``--img-size``, ``--num-classes``.

    ``num_classes`` is passed when the user gave ``--num-classes``, or when no
    ``--model-arg tasks=...`` names the heads (then ``NUM_CLASSES``).

    Raises:
        ConfigError: ``--model-arg num_classes`` (``--num-classes`` says it), or
            ``--num-classes`` with ``--model-arg tasks``, or ``--img-size`` and
            ``--model-arg img_size`` that disagree.
    """
    if "num_classes" in kwargs:
        raise ConfigError(
            f"--model-arg num_classes={kwargs['num_classes']!r}: give the classes as "
            "--num-classes instead"
        )
    options = dict(kwargs)
    if kwargs.get("tasks") is None:
        options["num_classes"] = NUM_CLASSES if args.num_classes is None else args.num_classes
    elif args.num_classes is not None:
        raise ConfigError(
            f"--num-classes {args.num_classes} with --model-arg tasks={kwargs['tasks']!r}: "
            "the tasks give the classes; leave out --num-classes"
        )
    if args.img_size is not None:
        given = kwargs.get("img_size", args.img_size)
        if given != args.img_size:
            raise ConfigError(
                f"--img-size {args.img_size} and --model-arg img_size={given!r} disagree: "
                "give the input size once"
            )
        options["img_size"] = args.img_size
    return options


def measured_task(model: nn.Module) -> str:
    """The task measured: ``default`` (from ``--num-classes``), else the model's first
    (``--model-arg tasks={name: classes}``)."""
    heads = getattr(model, "heads", {})
    return TASK if TASK in heads or not heads else next(iter(heads))


def check_results_file(path: Path, overwrite: bool) -> None:
    """Refuses a results file that exists, unless ``--overwrite`` says to replace it, or
    one that cannot be created (a file on its path, a folder it cannot be written in)."""
    if path.is_dir():
        raise ConfigError(f"--results-file {path} is a directory: give a .csv or .json file")
    refuse_replacing([path], overwrite, "--results-file")


# --------------------------------------------------------------------------- sides


@dataclass
class Sides:
    """The modnet model measured and, with ``--compare``, its baseline.

    ``modnet``/``baseline`` are what is timed (compiled where asked); the ``eager_``
    fields are the same modules uncompiled, for counting FLOPs and peak memory.
    """

    modnet: nn.Module
    eager_modnet: nn.Module
    channels_last: bool
    task: str
    baseline: nn.Module | None = None
    eager_baseline: nn.Module | None = None
    baseline_name: str | None = None
    baseline_task: str | None = None
    baseline_channels_last: bool | None = None


def build_sides(
    name: str,
    args: argparse.Namespace,
    device: torch.device,
    precision: bm.Precision,
    kwargs: dict[str, Any],
) -> Sides:
    """Creates the model (``from_timm`` for timm names) and the ``--compare`` baseline."""
    options = model_options(args, kwargs)
    timm_model = None
    if name.startswith("modnet_"):
        model = timm.create_model(name, **options)
    else:
        timm_model = timm.create_model(name, pretrained=False, **options)
        model = from_timm(timm_model, task=TASK)
    task = measured_task(model)
    baseline, baseline_name, baseline_task = None, None, None
    if args.compare == "timm":
        baseline = timm_model if timm_model is not None else bm.plain_twin(model, task)
        baseline_name = name if timm_model is not None else f"timm:{type(baseline).__name__}"
    elif args.compare == "export":
        baseline, baseline_name = model.export(task), "export"
    elif args.compare == "moe":
        baseline, baseline_name = bm.OutputMixingNet(model, task), "output-mixing"
    elif args.compare == "eager":
        baseline, baseline_name, baseline_task = model, "eager", task
    channels_last = args.channels_last
    if channels_last is None:
        channels_last = bm.uses_convolutions(model)
    baseline_layout = channels_last
    if args.compare == "layout":
        baseline, baseline_task, baseline_layout = copy.deepcopy(model), task, not channels_last
        baseline_name = "channels_last" if baseline_layout else "nchw"
    model = bm.place(model, device, precision.dtype, channels_last)
    if baseline is not None and baseline is not model:
        baseline = bm.place(baseline, device, precision.dtype, baseline_layout)
    sides = Sides(
        model, model, channels_last, task, baseline, baseline, baseline_name, baseline_task
    )
    sides.baseline_channels_last = baseline_layout
    if args.compile or args.compare == "eager":
        sides.modnet = torch.compile(model)
    if args.compile and baseline is not None and args.compare != "eager":
        sides.baseline = torch.compile(baseline)
    return sides


def measure(
    args: argparse.Namespace,
    name: str,
    bench: str,
    batch_size: int,
    device: torch.device,
    precision: bm.Precision,
    kwargs: dict[str, Any],
    label: str,
) -> dict[str, Any]:
    """One configuration: builds the sides, times them interleaved, returns the row."""
    print(f"{label}: building", file=sys.stderr, flush=True)
    sides = build_sides(name, args, device, precision, kwargs)
    x, y = bm.make_batch(
        sides.eager_modnet,
        batch_size,
        _head_classes(sides.eager_modnet.heads[sides.task]) or 1,
        device,
        precision.dtype,
        sides.channels_last,
    )

    layout = torch.channels_last if sides.baseline_channels_last else torch.contiguous_format
    x_baseline = x.contiguous(memory_format=layout)

    micro = args.micro_batch
    if micro is None:
        from ..train.evaluate import default_micro_batch

        micro = default_micro_batch(sides.eager_modnet)
    micro = micro if bench == "inference" and 0 < micro < batch_size else None

    def workload(model: nn.Module, task: str | None, x: torch.Tensor = x) -> bm.Workload:
        if bench == "train":
            return bm.training_workload(model, x, y, task, precision)
        return bm.inference_workload(model, x, task, precision, micro)

    matmul, matmul_flops = bm.matmul_workload(device, precision.compute_dtype, args.matmul_size)
    workloads = {"modnet": workload(sides.modnet, sides.task), "matmul": matmul}
    eager = {"modnet": workload(sides.eager_modnet, sides.task)}
    if sides.baseline is not None:
        workloads["baseline"] = workload(sides.baseline, sides.baseline_task, x_baseline)
        eager["baseline"] = workload(sides.eager_baseline, sides.baseline_task, x_baseline)
    flops = {side: bm.count_flops(w) for side, w in eager.items()}
    flops["matmul"] = matmul_flops

    print(f"{label}: warm-up", file=sys.stderr, flush=True)
    timer = bm.Interleaver(workloads, min_time=args.min_time, warmup=args.warmup)
    timer.run(args.rounds, bm.progress_printer(label))

    row: dict[str, Any] = dict(
        model=name,
        bench=bench,
        device=str(device),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
        malloc_tuned=malloc.tuned(),
        precision=precision.name,
        batch_size=batch_size,
        micro_batch=micro,
        img_size=bm.input_size(sides.eager_modnet)[-1],
        channels_last=sides.channels_last,
        compile=args.compile or args.compare == "eager",
        rounds=timer.rounds,
        matmul_gflops_per_sec=round(matmul_flops / timer.step_time("matmul") / 1e9, 1),
    )
    row.update(side_fields("", "modnet", sides.eager_modnet, timer, flops, batch_size))
    # Peak memory is measured on the eager model: a compiled side's is left empty
    # (None) rather than reported as its eager twin's.
    compiled = {"modnet": sides.modnet is not sides.eager_modnet}
    compiled["baseline"] = sides.baseline is not sides.eager_baseline
    memory = {} if args.no_memory else {
        side: None if compiled[side] else bm.peak_memory(w) for side, w in eager.items()
    }  # fmt: skip
    if memory:
        row["peak_memory_mib"] = mebibytes(memory["modnet"])
    if sides.baseline is None:
        return row
    row["baseline"] = sides.baseline_name
    row.update(side_fields("baseline_", "baseline", sides.eager_baseline, timer, flops, batch_size))
    if memory:
        row["baseline_peak_memory_mib"] = mebibytes(memory["baseline"])
        both = None not in (memory["modnet"], memory["baseline"])
        row["memory_ratio"] = round(memory["modnet"] / memory["baseline"], 4) if both else None
    ratio = timer.ratio("modnet", "baseline")
    row.update(ratio=round(ratio.median, 4), ratio_low=round(ratio.low, 4))
    row["ratio_high"] = round(ratio.high, 4)
    return row


def mebibytes(size: int | None) -> float | None:
    """Bytes to MiB (2**20 bytes), one decimal; None (not measured) stays None."""
    return None if size is None else round(size / 2**20, 1)


def side_fields(
    prefix: str,
    name: str,
    model: nn.Module,
    timer: bm.Interleaver,
    flops: dict[str, int],
    batch_size: int,
) -> dict[str, Any]:
    """Throughput, GMACs per sample and achieved FLOP/s of one side."""
    step = timer.step_time(name)
    utilization = timer.ratio(name, "matmul", work=flops).median
    return {
        f"{prefix}param_count_m": round(bm.parameter_count(model) / 1e6, 3),
        f"{prefix}gmacs": bm.significant(flops[name] / 2 / batch_size / 1e9),
        f"{prefix}samples_per_sec": round(batch_size / step, 2),
        f"{prefix}step_time_ms": round(step * 1e3, 3),
        f"{prefix}gflops_per_sec": bm.significant(flops[name] / step / 1e9),
        f"{prefix}flops_utilization": round(utilization, 4),
    }


def parse_kwargs(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``key=value`` strings to a dict; values are Python literals where they parse."""
    return parse_model_args(pairs)
