"""``modnet export``: one task's network with its route baked in, as a plain model file."""

from __future__ import annotations

import argparse
from pathlib import Path

TRUST = (
    "Loading a .pt2 file with torch.export.load can execute code stored in the file: "
    "load .pt2 files only from sources you trust. --format safetensors writes the weights "
    "and a JSON config instead, which load without running anything from the files "
    "(modnet.export.load_safe)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="a task's network as a plain model file",
        description="Bake a task's route into a plain stack of blocks. --format pt2 (default) "
        "saves it with torch.export: it loads with torch alone, "
        "`torch.export.load(path).module()`. --format safetensors saves its state dict "
        "(model.safetensors) and config.json, rebuilt by modnet.export.load_safe. Both carry "
        "the task's preprocessing record (size, channels, resize, mean, std, class names), "
        "read by modnet.export.load_transform. " + TRUST,
    )
    parser.add_argument("run_dir", help="run or model directory")
    parser.add_argument("--task", required=True, help="the task to export")
    parser.add_argument(
        "--format",
        choices=("pt2", "safetensors"),
        default="pt2",
        help="pt2: a torch.export program (trusted sources only); safetensors: weights and "
        "a JSON config, safe to load from anywhere",
    )
    parser.add_argument(
        "--out",
        help="output file for pt2, folder for safetensors (default: RUN_DIR/export/<task>.pt2 "
        "or RUN_DIR/export/<task>/); never among a run's, a checkpoint's or a saved model's "
        "own files",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files at --out (the run's own export folder is always replaced)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="example batch for tracing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError, RunDirError
    from ..export import SAFE_CONFIG, SAFE_WEIGHTS, check_export_target, save_exported, save_safe
    from ..io import load_model, partly_trained
    from ._options import check_writable, refuse_checkpoint_folder, refuse_replacing

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    pt2 = args.format == "pt2"
    own = Path(args.run_dir) / "export" / (f"{args.task}.pt2" if pt2 else args.task)
    out = Path(args.out) if args.out else own
    option = "--out" if args.out else "the default --out"
    refuse_checkpoint_folder(out.parent if pt2 else out, option)
    folder = Path(args.run_dir) / "export"
    if not args.out and (folder.is_file() or folder.is_symlink() and not folder.is_dir()):
        raise ConfigError(
            f"{folder} is a file, but modnet export writes a run's exports into the folder "
            f"{folder}: move that file away, or give --out"
        )
    if args.out and pt2:
        if Path(args.out).is_dir() or Path(args.out).suffix != ".pt2":
            raise ConfigError(
                f"--out {args.out} is not a .pt2 file path: give one such as model.pt2 "
                "(a folder is --out for --format safetensors)"
            )
        check_export_target(args.out, args.task, safe=False, option="--out", default=own)
        refuse_replacing([Path(args.out)], args.overwrite)
    elif args.out:
        if Path(args.out).is_file():
            raise ConfigError(f"--out {args.out} is a file: --format safetensors writes a folder")
        check_export_target(args.out, args.task, safe=True, option="--out", default=own)
        check_writable(args.out)
        refuse_replacing([Path(args.out) / n for n in (SAFE_WEIGHTS, SAFE_CONFIG)], args.overwrite)
    model, manifest = load_model(args.run_dir, tasks=[args.task])
    partly = partly_trained(args.run_dir, manifest, [args.task])
    if partly:
        raise RunDirError(f"task {args.task!r} is not exported: {partly}")
    net = model.export(args.task).eval()
    transform = manifest["tasks"][args.task].get("transform")
    # --out was checked above; the run's own export folder is always replaced
    overwrite = args.overwrite or not args.out
    if args.format == "safetensors":
        path = save_safe(net, model.config, out, transform, overwrite=overwrite)
        print(f"exported task {args.task!r} to {path}")
        print(f"load it with: modnet.export.load_safe({str(path)!r})")
        return 0
    path = save_exported(
        net, out, batch_size=args.batch_size, transform=transform, overwrite=overwrite
    )
    print(f"exported task {args.task!r} to {path}")
    print(f"load it with: torch.export.load({str(path)!r}).module()  (trusted files only)")
    return 0
