"""The benchmark library and ``modnet bench``: baselines, counters, rows. No timings asserted."""

from __future__ import annotations

import csv
import json
import math
import re
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

import modnet
from modnet import benchmark as bm
from modnet.cli import build_parser, main
from modnet.commands.bench import build_sides, parse_kwargs
from tests.conftest import TINY_CONV, TINY_VIT, images, moved_off_init, tiny_conv, tiny_vit

CPU = torch.device("cpu")
TINY_CLI = ["--batch-size", "2", "--rounds", "2", "--warmup", "1", "--min-time", "0"]
TINY_CLI += ["--matmul-size", "64"]
CONV_KWARGS = ["--model-kwargs", *(f"{k}={v}" for k, v in TINY_CONV.items())]


# ----------------------------------------------------------------------- baselines


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_plain_twin_computes_the_task_exactly(build):
    model = moved_off_init(build(tasks={"a": 5, "b": 3})).eval()
    twin = bm.plain_twin(model, "b").eval()
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x, task="b"), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, modnet.ModularNet) for m in twin.modules())


def test_plain_twin_of_a_vit_is_timms_vision_transformer_of_the_same_shape():
    from timm.models.vision_transformer import VisionTransformer

    model = tiny_vit(tasks={"a": 5})
    twin = bm.plain_twin(model, "a")
    assert type(twin) is VisionTransformer
    assert len(twin.blocks) == model.depth
    assert twin.embed_dim == TINY_VIT["embed_dim"]


def test_output_mixing_is_the_coefficient_weighted_sum_of_every_templates_output():
    model = moved_off_init(tiny_conv(tasks={"a": 4})).eval()
    reference = bm.OutputMixingNet(model, "a")
    x = images(model)
    pool, stats = model.pool, model.norm_stats["a"]
    coefficients = model.routes["a"].coefficients().detach()
    with torch.no_grad():
        h = model.trunk.embed(x)
        for layer in range(model.depth):
            blocks = [
                pool.build_block(pool.select(k), stats.layer(layer)).eval()
                for k in range(pool.num_templates)
            ]
            h = sum(coefficients[layer, k] * block(h) for k, block in enumerate(blocks))
        by_hand = model.heads["a"](model.trunk.pre_logits(model.trunk.norm(h)))
        torch.testing.assert_close(reference(x), by_hand, rtol=1e-5, atol=1e-5)


def test_output_mixing_equals_weight_mixing_for_one_hot_routes():
    model = moved_off_init(tiny_conv(tasks={"a": 4})).eval()
    one_hot = torch.zeros(model.depth, model.pool.num_templates)
    one_hot[torch.arange(model.depth), torch.tensor([2, 0, 1, 1])] = 1.0
    model.set_route("a", one_hot)
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(
            bm.OutputMixingNet(model, "a")(x), model(x, task="a"), rtol=1e-5, atol=1e-5
        )


def test_output_mixing_refuses_a_hard_route():
    model = tiny_conv(tasks={"a": 4})
    model.set_route("a", [0, 1])
    with pytest.raises(ValueError, match="hard route"):
        bm.OutputMixingNet(model, "a")


# ------------------------------------------------------------- counters and memory


def test_flops_of_a_linear_layer_are_two_per_multiply_add():
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert bm.count_flops(bm.inference_workload(layer, x)) == 2 * 4 * 16 * 8


@pytest.mark.parametrize("groups", [1, 8])
def test_a_convolution_training_step_counts_three_forwards_groups_included(groups):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 6, 6)
    forward = bm.count_flops(bm.inference_workload(conv, x))
    assert forward == 2 * 2 * 36 * (8 * 8 // groups * 9)
    x.requires_grad_(True)  # input, weight and bias gradients: two more forwards' worth
    step = bm.Workload(lambda: conv(x).sum().backward(), 2, CPU)
    assert bm.count_flops(step) == 3 * forward


def test_soft_route_flops_include_mixing_the_templates():
    model = tiny_conv(tasks={"a": 4})
    x = images(model, batch=1)
    plain = bm.count_flops(bm.inference_workload(model.export("a"), x))
    mixed = bm.count_flops(bm.inference_workload(model, x, task="a"))
    mixing = 2 * model.depth * model.pool.num_templates * model.pool.template_numel
    assert mixed - plain == mixing


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_hypernetwork_routes_count_their_flops_under_inference_mode(build):
    # torch's module tracker failed on the route embedding, a leaf that requires grad,
    # going into the hypernetwork under inference_mode (a traceback in modnet bench)
    model = build(tasks={"a": 4}, route="hyper")
    x = images(model, batch=1)
    plain = bm.count_flops(bm.inference_workload(model.export("a"), x))
    assert bm.count_flops(bm.inference_workload(model, x, task="a")) > plain > 0


def test_storage_bytes_counts_a_shared_storage_once():
    base = torch.zeros(256)
    assert bm.storage_bytes([base, base[:10], base.view(16, 16)]) == 256 * 4
    assert bm.storage_bytes([torch.empty(3, device="meta")]) == 0


def test_peak_memory_is_resident_state_plus_the_largest_transient_allocation():
    resident = torch.zeros(1000)
    size = 2**20

    def step():
        a = torch.ones(size)  # 4 MiB
        b = a * 2  # another 4 MiB while a is alive
        del a, b

    peak = bm.peak_memory(bm.Workload(step, 1, CPU, lambda: [resident]))
    expected = 4000 + 2 * size * 4
    assert expected <= peak < expected + 1024  # (+ a few bytes of scalars)


def test_training_peak_memory_counts_weights_gradients_and_momentum():
    model = nn.Linear(256, 256, bias=False)
    x, y = torch.randn(1, 256), torch.zeros(1, dtype=torch.long)
    peak = bm.peak_memory(bm.training_workload(model, x, y))
    weights = 256 * 256 * 4
    assert peak >= 3 * weights  # weight, momentum and gradient at once
    assert peak < 4 * weights


def test_matmul_workload_reports_its_flops():
    workload, flops = bm.matmul_workload(CPU, size=64)
    assert flops == 2 * 64**3
    assert workload.step().shape == (64, 64)


# ------------------------------------------------------------------------ timing


def test_interleaver_alternates_the_order_of_the_sides():
    calls = []
    workloads = {name: bm.Workload(lambda name=name: calls.append(name), 1, CPU) for name in "ab"}
    timer = bm.Interleaver(workloads, min_time=0.0, warmup=1)
    timer.warmup()
    calls.clear()
    timer.run(4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert timer.rounds == 4
    assert all(len(seconds) == 4 for seconds in timer.seconds.values())


def test_ratio_is_the_median_of_per_round_ratios():
    workloads = {
        "subject": bm.Workload(lambda: None, 8, CPU),
        "baseline": bm.Workload(lambda: None, 8, CPU),
    }
    timer = bm.Interleaver(workloads)
    timer.seconds = {"subject": [1.0, 2.0, 4.0, 1.0], "baseline": [2.0, 2.0, 2.0, 1.5]}
    assert timer.ratios("subject", "baseline") == [2.0, 1.0, 0.5, 1.5]
    ratio = timer.ratio("subject", "baseline")
    assert ratio.median == 1.25
    assert ratio.low <= ratio.median <= ratio.high
    assert timer.samples_per_sec("subject") == 8 / 1.5
    work = timer.ratio("subject", "baseline", work={"subject": 10, "baseline": 5})
    assert work.median == 2.5


def test_targets_compare_in_their_direction():
    assert bm.Target(">=", 0.97).met(0.98) and not bm.Target(">=", 0.97).met(0.96)
    assert bm.Target("<=", 1.15).met(1.0) and not bm.Target("<=", 1.15).met(1.2)
    assert str(bm.Target(">=", 3.5)) == ">= 3.5"
    with pytest.raises(ValueError, match="unknown comparison"):
        bm.Target(">", 1.0)


# ----------------------------------------------------------------- devices, inputs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
        bm.resolve_device("cuda")


def test_unknown_devices_and_precisions_are_refused():
    with pytest.raises(ValueError, match="unsupported device"):
        bm.resolve_device("meta")
    with pytest.raises(ValueError, match="unknown precision"):
        bm.Precision.parse("float8")
    amp = bm.Precision.parse("amp_bfloat16")
    assert (amp.dtype, amp.autocast, amp.compute_dtype) == (
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
    )


def test_place_makes_4d_weights_channels_last_and_keeps_the_outputs():
    model = moved_off_init(tiny_conv(tasks={"a": 3})).eval()
    x = images(model)
    with torch.no_grad():
        before = model(x, task="a")
        bm.place(model, CPU, torch.float32, channels_last=True)
        after = model(x.contiguous(memory_format=torch.channels_last), task="a")
    stem = model.trunk.stem[0].weight
    assert stem.is_contiguous(memory_format=torch.channels_last)
    assert model.pool.stacked("conv_pw.weight").dim() == 5
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_make_batch_follows_the_model_input_size():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=3)
    x, y = bm.make_batch(vit, 5, 3, CPU)
    assert x.shape == (5, 3, 32, 32) and y.shape == (5,) and int(y.max()) < 3
    model = tiny_conv(tasks={"a": 3})
    x, _ = bm.make_batch(model, 2, 3, CPU, channels_last=True)
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert bm.uses_convolutions(model) and not bm.uses_convolutions(tiny_vit(tasks={"a": 3}))


# ------------------------------------------------------------- training backward


def test_hard_route_layers_get_gradients_from_one_unbind_per_tensor():
    model = moved_off_init(tiny_conv(tasks={"a": 3})).train()
    route = [0, 2, 2, 1]
    model.set_route("a", route)
    views = model.pool.select_many(route)
    assert "Unbind" in views[0]["conv_pw.weight"].grad_fn.name()
    x = images(model)
    model(x, task="a").sum().backward()
    fast = model.pool.stacked("conv_pw.weight").grad.clone()
    model.zero_grad()
    stats = model.norm_stats["a"]
    h = model.trunk.embed(x)
    for layer, index in enumerate(route):
        h = model.pool.run(h, model.pool.select(index), stats.layer(layer))
    model.heads["a"](model.trunk.pre_logits(model.trunk.norm(h))).sum().backward()
    torch.testing.assert_close(fast, model.pool.stacked("conv_pw.weight").grad)


# ---------------------------------------------------------------------------- CLI


def test_bench_writes_one_csv_row_per_configuration_with_every_field(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    args = ["bench", "--model", "modnet_conv_tiny", *CONV_KWARGS, "--bench", "both"]
    assert main([*args, *TINY_CLI, "--results-file", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["bench"] for row in rows] == ["inference", "train"]
    fields = {
        "model", "bench", "device", "threads", "precision", "batch_size", "img_size",
        "channels_last", "compile", "param_count_m", "gmacs", "samples_per_sec",
        "step_time_ms", "gflops_per_sec", "flops_utilization", "peak_memory_mib",
        "matmul_gflops_per_sec", "rounds",
    }  # fmt: skip
    assert fields <= set(rows[0])
    assert rows[0]["channels_last"] == "True"  # the faster layout for the conv family
    # training counts the backward too (no input gradient for the stem: a bit under 3x)
    assert 2.5 < float(rows[1]["gmacs"]) / float(rows[0]["gmacs"]) <= 3.0
    assert all(float(row["samples_per_sec"]) > 0 for row in rows)
    assert "samples/s" in capsys.readouterr().out


def test_bench_compare_timm_prints_the_ratio_for_a_timm_vit(tmp_path, capsys):
    out = tmp_path / "rows.json"
    kwargs = ["img_size=16", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
    args = ["bench", "--model", "vit_tiny_patch16_224", "--model-kwargs", *kwargs]
    assert main([*args, *TINY_CLI, "--compare", "timm", "--results-file", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["baseline"] == "vit_tiny_patch16_224"
    assert row["param_count_m"] == row["baseline_param_count_m"]
    assert row["gmacs"] == row["baseline_gmacs"]
    assert row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
    assert row["channels_last"] is False
    assert "modnet/vit_tiny_patch16_224 throughput ratio" in capsys.readouterr().out


@pytest.mark.parametrize("compare", ["timm", "export", "moe", "layout"])
def test_bench_compare_baselines_of_a_modnet_model(compare, tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", "--model", "modnet_conv_tiny", *CONV_KWARGS, "--no-memory"]
    assert main([*args, *TINY_CLI, "--compare", compare, "--results-file", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["ratio"] > 0 and "peak_memory_mib" not in row
    if compare == "moe":  # K templates run per layer: K times the block FLOPs
        assert row["baseline_gmacs"] > 2 * row["gmacs"]
    if compare == "layout":  # the conv family runs channels_last, the baseline NCHW
        assert row["channels_last"] is True and row["baseline"] == "nchw"


def test_bench_compare_eager_compiles_only_the_modnet_side():
    args = build_parser().parse_args(["bench", "--compare", "eager", *CONV_KWARGS])
    kwargs = parse_kwargs(args.model_kwargs)
    sides = build_sides("modnet_conv_tiny", args, CPU, bm.Precision.parse("float32"), kwargs)
    assert isinstance(sides.modnet, torch._dynamo.eval_frame.OptimizedModule)
    assert sides.baseline is sides.eager_modnet is sides.modnet._orig_mod
    assert sides.baseline_task == "default"


def test_bench_refuses_cuda_without_cuda_and_bad_result_files(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "--results-file", str(tmp_path / "rows.txt")]) == 2
    assert ".csv or .json" in capsys.readouterr().err


def test_model_kwargs_parse_python_literals():
    assert parse_kwargs(["depth=16", "route=softmax", "ratio=4.5", "flag=True"]) == {
        "depth": 16,
        "route": "softmax",
        "ratio": 4.5,
        "flag": True,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_kwargs(["depth"])


def test_micro_batched_inference_runs_every_sample_once_in_chunks():
    model = tiny_conv(tasks={"a": 3})
    x = images(model, batch=10)
    calls = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(len(args[0])), with_kwargs=True
    )
    whole = bm.inference_workload(model, x, task="a")
    chunked = bm.inference_workload(model, x, task="a", micro_batch=4)
    plain = bm.count_flops(bm.inference_workload(model.export("a"), x))
    mixing = bm.count_flops(whole) - plain  # mixing the templates: once per forward pass
    assert mixing > 0 and bm.count_flops(chunked) == plain + 3 * mixing
    calls.clear()
    outputs = chunked.step()
    assert calls == [4, 4, 2]
    torch.testing.assert_close(torch.cat(outputs), whole.step()[0], atol=1e-5, rtol=1e-5)


def test_bench_inference_uses_the_family_micro_batch_unless_told(tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", "--model", "modnet_conv_tiny", *CONV_KWARGS, "--no-memory"]
    assert main([*args, *TINY_CLI, "--batch-size", "40", "--results-file", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["micro_batch"] == 16  # modnet.train.evaluate.MICRO_BATCH["conv"]
    again = [*TINY_CLI, "--micro-batch", "0", "--results-file", str(out), "--overwrite"]
    assert main([*args, *again]) == 0
    (row,) = json.loads(out.read_text())
    assert row["micro_batch"] is None
    assert main([*args, "--micro-batch", "-1"]) == 2


CONV_ARGS = ["--model-arg", *(f"{k}={v}" for k, v in TINY_CONV.items())]
BAD_INPUTS = [
    (["--model", "modnet_conv_tiny", "modnet_vit_tyni"], "unknown model 'modnet_vit_tyni'"),
    (["--model", "vit_tiny_patch16_22"], "unknown model 'vit_tiny_patch16_22': give a modnet_*"),
    (["--model", "resnet18"], "from_timm cannot convert this ResNet"),
    (["--model-arg", "num_templates=0"], "model option num_templates must be >= 1, got 0"),
    (
        ["--model", "vit_tiny_patch16_224", "--model-arg", "img_sizee=32"],
        "unknown model option 'img_sizee' for vit_tiny_patch16_224: check its spelling",
    ),
    (["--model-arg", "num_classes=3"], "give the classes as --num-classes instead"),
    (
        ["--model-arg", "tasks={'a': 3}", "--num-classes", "5"],
        "--num-classes 5 with --model-arg tasks={'a': 3}: the tasks give the classes; leave out",
    ),
    (
        ["--model-arg", "img_size=64", "--img-size", "32"],
        "--img-size 32 and --model-arg img_size=64 disagree: give the input size once",
    ),
    (["--batch-size", "8", "0"], "--batch-size 0 is not a batch size: give sizes of at least 1"),
    (["--batch-size", "-1"], "--batch-size -1 is not a batch size"),
    (["--rounds", "0"], "--rounds must be at least 1 (timed rounds per side), got 0"),
    (["--warmup", "-1"], "--warmup must be at least 0"),
    (["--min-time", "-0.5"], "--min-time must be a number of seconds >= 0"),
    (["--min-time", "nan"], "--min-time must be a number of seconds >= 0"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--num-classes", "0"], "--num-classes must be at least 1"),
    (["--img-size", "0"], "--img-size must be at least 1"),
    (["--matmul-size", "0"], "--matmul-size must be at least 1"),
    (["--micro-batch", "-1"], "--micro-batch must be at least 0"),
    (["--device", "foo"], "--device 'foo' is not a device: use cpu or cuda"),
    (["--device", "mps"], "unsupported device 'mps': use --device cpu or cuda"),
    # output mixing needs soft coefficients: refused before the first model is measured
    (
        ["--model", "modnet_conv_tiny", "vit_tiny_patch16_224", "--compare", "moe"],
        "--compare moe with vit_tiny_patch16_224: from_timm runs a timm model's blocks in order",
    ),
    (
        ["--model-arg", "route=hard", "--compare", "moe"],
        "--compare moe with modnet_conv_tiny --model-arg route=hard: output mixing needs",
    ),
]


def one_error_line(capsys) -> str:
    """The only output of a refused command: one stderr line (nothing measured or printed)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("modnet bench: error: ")
    return line.removeprefix("modnet bench: error: ")


@pytest.mark.parametrize(
    ("bad", "message"), BAD_INPUTS, ids=[" ".join(bad) for bad, _ in BAD_INPUTS]
)
def test_bench_checks_every_input_before_measuring(bad, message, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert main(["bench", *TINY_CLI, "--no-memory", *bad, "--results-file", str(out)]) == 2
    assert message in one_error_line(capsys)
    assert not out.exists()


def test_bench_names_a_misspelt_model_option_as_train_does(tmp_path, capsys):
    typo = ["--model-arg", "num_templatess=3"]
    assert main(["train", *typo, "--out", str(tmp_path / "run")]) == 2
    trained = capsys.readouterr().err.strip().removeprefix("modnet train: error: ")
    assert main(["bench", "--model", "modnet_conv_tiny", *typo]) == 2
    assert one_error_line(capsys) == trained
    assert "unknown model option 'num_templatess' for modnet_conv_tiny" in trained


@pytest.mark.parametrize("name", ["rows.csv", "rows.json"])
def test_bench_replaces_an_existing_results_file_only_with_overwrite(name, tmp_path, capsys):
    out = tmp_path / name
    mine = b"my own numbers,\r\n1,2\n"
    out.write_bytes(mine)
    args = ["bench", "--model", "modnet_conv_tiny", *CONV_ARGS, *TINY_CLI, "--no-memory"]
    args += ["--results-file", str(out)]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.endswith(
        f"{out} already exists: choose another --results-file, or pass --overwrite to replace it"
    )
    assert out.read_bytes() == mine
    assert main([*args, "--overwrite"]) == 0
    rows = (
        json.loads(out.read_text()) if out.suffix == ".json" else list(csv.DictReader(out.open()))
    )
    assert [row["model"] for row in rows] == ["modnet_conv_tiny"]
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_bench_refuses_a_directory_as_results_file(tmp_path, capsys):
    folder = tmp_path / "rows.csv"
    folder.mkdir()
    assert main(["bench", "--results-file", str(folder)]) == 2
    assert "is a directory" in one_error_line(capsys)
    assert list(folder.iterdir()) == []


def test_bench_help_documents_overwrite():
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "--overwrite" in help_text and "replace an existing --results-file" in help_text


@pytest.mark.slow  # a fresh process: kineto reads its log level once per process
def test_bench_keeps_the_profilers_cpp_logging_off_stderr(tmp_path):
    """kineto logs `USDT: ... profiler_start` and, without a GPU, `ERROR: ...
    gpuGetDeviceCount failed` when the CPU memory profiler starts (once per process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--rounds", "1", "--warmup", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "modnet", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "peak" in done.stdout  # the memory profiler ran
    assert all(line.startswith("[1/1] modnet_conv_tiny") for line in done.stderr.splitlines())


# ------------------------------------------------------------------ memory layout


class ConvInputLayouts(torch.overrides.TorchFunctionMode):
    """Records the layout of every 2-D convolution's input: "NHWC" or "NCHW"."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.conv2d, torch.conv2d):
            x = args[0]
            nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            self.seen.append("NHWC" if nhwc else "NCHW")
        return func(*args, **(kwargs or {}))


def conv_input_layouts(model: nn.Module, x: torch.Tensor, task: str | None) -> set[str]:
    mode = ConvInputLayouts()
    with torch.no_grad(), mode:
        model.eval()(x) if task is None else model.eval()(x, task=task)
    assert len(mode.seen) > 1
    return set(mode.seen)


@pytest.mark.parametrize(
    ("options", "modnet_layout", "baseline_layout"),
    [
        (["--compare", "layout"], "NHWC", "NCHW"),
        (["--compare", "layout", "--no-channels-last"], "NCHW", "NHWC"),
        (["--compare", "export", "--no-channels-last"], "NCHW", "NCHW"),
        (["--compare", "timm", "--no-channels-last"], "NCHW", "NCHW"),
        (["--compare", "export"], "NHWC", "NHWC"),
    ],
)
def test_bench_sides_run_every_convolution_in_the_layout_they_are_labelled(
    options, modnet_layout, baseline_layout
):
    args = build_parser().parse_args(["bench", *options, *CONV_ARGS])
    kwargs = parse_kwargs(args.model_kwargs)
    sides = build_sides("modnet_conv_tiny", args, CPU, bm.Precision.parse("float32"), kwargs)
    assert sides.channels_last == (modnet_layout == "NHWC")
    assert sides.baseline_channels_last == (baseline_layout == "NHWC")
    x, _ = bm.make_batch(sides.modnet, 2, 10, CPU, channels_last=sides.channels_last)
    assert conv_input_layouts(sides.modnet, x, "default") == {modnet_layout}
    layout = torch.channels_last if sides.baseline_channels_last else torch.contiguous_format
    seen = conv_input_layouts(
        sides.baseline, x.contiguous(memory_format=layout), sides.baseline_task
    )
    assert seen == {baseline_layout}


# ------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("train", [False, True])
def test_attention_flops_are_counted_on_the_cpu(train):
    """Forward: QK^T and AV, two matmuls; backward: five more (torch's own formulas)."""
    b, h, s, d = 2, 3, 17, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=train) for _ in range(3))

    def step():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if train:
            out.sum().backward()

    matmul = 2 * b * h * s * s * d
    assert bm.count_flops(bm.Workload(step, b, CPU)) == (7 if train else 2) * matmul


# ------------------------------------------------------------------- failed sweeps


def fail_at_batch(monkeypatch, batch: int) -> None:
    """Makes ``measure`` raise as torch does when memory runs out, at one batch size."""
    from modnet.commands import bench

    real = bench.measure

    def measure(args, name, mode, batch_size, *rest):
        if batch_size == batch:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...\nmore")
        return real(args, name, mode, batch_size, *rest)

    monkeypatch.setattr(bench, "measure", measure)


@pytest.mark.parametrize("name", ["sweep.csv", "sweep.json"])
def test_a_failed_configuration_keeps_the_rows_measured_before_it(
    name, tmp_path, capsys, monkeypatch
):
    fail_at_batch(monkeypatch, 3)
    out = tmp_path / name
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--no-memory", "--results-file", str(out)]
    assert main([*args, "--batch-size", "2", "4", "3", "5"]) == 1
    rows = (
        json.loads(out.read_text()) if name.endswith("json") else list(csv.DictReader(out.open()))
    )
    assert [int(row["batch_size"]) for row in rows] == [2, 4]
    failed, saved = capsys.readouterr().err.splitlines()[-2:]
    assert failed == (
        "modnet bench: modnet_conv_tiny inference batch 3 failed: DefaultCPUAllocator: can't "
        "allocate memory: you tried ...: leave this configuration out (a smaller --batch-size "
        "if memory ran out) and run again"
    )
    assert saved == f"modnet bench: wrote 2 rows to {out}"


def test_a_results_file_that_appears_during_the_run_is_kept_and_the_rows_printed(
    tmp_path, capsys, monkeypatch
):
    from modnet.commands import bench

    out = tmp_path / "rows.csv"
    real = bench.measure

    def measure(*args):
        row = real(*args)
        out.write_text("someone else's\n")
        return row

    monkeypatch.setattr(bench, "measure", measure)
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--no-memory", "--results-file", str(out)]
    assert main(args) == 2
    assert out.read_text() == "someone else's\n"
    captured = capsys.readouterr()
    printed = list(csv.DictReader(captured.out.splitlines()[1:]))
    assert [row["model"] for row in printed] == ["modnet_conv_tiny"]
    assert captured.err.splitlines()[-1].endswith(
        "already exists: choose another --results-file, or pass --overwrite to replace it (it "
        "appeared while modnet bench ran and was left as it is; the rows measured, 1 row, are "
        "printed above on stdout)"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


# ------------------------------------------------------------------- symbolic links


@pytest.mark.parametrize("dangling", [True, False])
def test_a_results_file_that_is_a_symbolic_link_counts_as_existing(dangling, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "target.csv"
    if not dangling:
        target.parent.mkdir()
        target.write_text("mine\n")
    link = tmp_path / "rows.csv"
    link.symlink_to(target)
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--no-memory", "--results-file", str(link)]
    assert main(args) == 2
    assert one_error_line(capsys) == (
        f"{link} (a symbolic link to {target}) already exists: choose another --results-file, "
        "or pass --overwrite to replace it"
    )
    assert link.is_symlink() and target.exists() != dangling
    assert main([*args, "--overwrite"]) == 0  # writes the file the link points to
    assert link.is_symlink() and link.resolve() == target
    assert [row["model"] for row in csv.DictReader(target.open())] == ["modnet_conv_tiny"]


def test_refuse_existing_counts_a_dangling_link_for_every_writer(tmp_path):
    from modnet.errors import ConfigError
    from modnet.io.fs import refuse_existing

    link = tmp_path / "model.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="already exists: choose another directory"):
        refuse_existing([link], "directory", "overwrite=True")


def test_bench_measures_the_first_task_of_a_tasks_model_arg(tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", *CONV_ARGS, "--model-arg", 'tasks={"a": 3, "b": 5}', *TINY_CLI]
    assert main([*args, "--no-memory", "--compare", "export", "--results-file", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["model"] == "modnet_conv_tiny" and row["ratio"] > 0
    parsed = build_parser().parse_args(["bench", *CONV_ARGS, "--model-arg", 'tasks={"a": 3}'])
    kwargs = parse_kwargs(parsed.model_kwargs)
    sides = build_sides("modnet_conv_tiny", parsed, CPU, bm.Precision.parse("float32"), kwargs)
    assert sides.task == "a" and list(sides.modnet.heads) == ["a"]


def test_bench_leaves_peak_memory_of_a_compiled_side_empty(tmp_path, capsys, monkeypatch):
    """Peak memory is measured on eager models: a compiled side has none, and no ratio."""
    from modnet.commands import bench

    def build(*args):  # compiling is slow: a wrapper stands in for torch.compile's
        sides = real(*args)
        sides.modnet = _Wrapped(sides.eager_modnet)
        return sides

    real = bench.build_sides
    monkeypatch.setattr(bench, "build_sides", build)
    out = tmp_path / "rows.json"
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--compare", "eager", "--results-file", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())
    assert row["peak_memory_mib"] is None and row["memory_ratio"] is None
    assert row["baseline_peak_memory_mib"] > 0
    printed = capsys.readouterr().out
    assert "peak memory n/a (compiled)" in printed and "peak memory ratio" not in printed


class _Wrapped(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def test_every_results_column_is_documented_in_the_help_and_the_readme(tmp_path):
    from pathlib import Path

    out = tmp_path / "rows.json"
    args = ["bench", *CONV_ARGS, *TINY_CLI, "--compare", "export", "--results-file", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for column in row:
        documented = column.removeprefix("baseline_") if column != "baseline" else column
        assert documented in help_text, column
        assert f"`{documented}`" in readme, column
    assert "peak_memory_mib" in row and "MiB (2**20 bytes)" in help_text


# --------------------------------------------------------------------- small errors


def test_ratio_of_nothing_and_make_batch_without_a_size_name_the_fix():
    with pytest.raises(ValueError, match="no ratios to summarise: time at least one round"):
        bm.Ratio.of([])
    with pytest.raises(ValueError, match=r"pass make_batch\(\.\.\., size=\(channels, height"):
        bm.make_batch(nn.Linear(3, 3), 2, 3, CPU)
    x, _ = bm.make_batch(nn.Linear(3, 3), 2, 3, CPU, size=(1, 4, 5))
    assert x.shape == (2, 1, 4, 5)


@pytest.mark.parametrize(
    ("threads", "scale", "message"),
    [
        (0, 1.0, "--bench-threads must be at least 1 (torch CPU threads), got 0"),
        (1, math.nan, "--bench-scale must be a number above 0 (it multiplies every round count)"),
        (1, 0.0, "--bench-scale must be a number above 0 (it multiplies every round count)"),
    ],
)
def test_the_bench_suite_refuses_bad_options_as_usage_errors(threads, scale, message):
    import importlib

    conftest = importlib.import_module("bench.conftest")  # the suite's own check
    options = {"--bench-threads": threads, "--bench-scale": scale}
    config = SimpleNamespace(getoption=options.__getitem__)
    with pytest.raises(pytest.UsageError, match=re.escape(message)):
        conftest.pytest_configure(config)


@pytest.mark.slow  # a fresh pytest process
def test_a_bad_bench_suite_option_is_a_usage_error_without_a_traceback():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"]
        + ["bench/test_flops.py", "--bench-scale", "nan"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert done.returncode == 4  # pytest's usage error
    assert "--bench-scale must be a number above 0" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
