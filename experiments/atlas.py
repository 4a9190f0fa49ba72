"""Task vectors with learned anisotropic scaling (aTLAS, Zhang et al. 2024) at small scale.

A plain convnet (``modnet_conv_tiny`` with one template per layer and the identity
hard route) is pretrained on one dataset, then fine-tuned (pool and trunk, norm
statistics frozen) on several tasks; each fine-tune minus the pretrained weights
is a task vector. Two uses of the vectors, all through ``modnet.compose``:

1. Few-shot learning of a new task from k labelled images per class, training
   only: the new head (linear probe); the head and one coefficient per task
   vector (isotropic); the head and one coefficient per vector and parameter
   tensor (anisotropic, aTLAS); or everything (full fine-tuning).
2. Task addition: one model for all vector tasks, ``base + sum_k c_k tau_k``
   with each task's own head, with uniform coefficients (1/K, or the best single
   value on the few labelled images) against coefficients learned on 10 labelled
   images per class and task (isotropic, anisotropic), or without labels by
   minimising prediction entropy with a class-balance term (anisotropic,
   unsupervised; entropy alone collapses to one class per task).

    python experiments/atlas.py --data-root ../shared/data --out runs/experiments/atlas
    python experiments/atlas.py --quick
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    base_config,
    cell,
    command_line,
    markdown_table,
    parser,
    seeds,
    write_results,
)
from modnet import io  # noqa: E402
from modnet.compose import TaskVector, TaskVectorComposer, fit, prediction_entropy  # noqa: E402
from modnet.data import TaskData, load_task, parse_synthetic_spec  # noqa: E402
from modnet.train import evaluate, train, transfer  # noqa: E402

PLAIN = dict(route="hard", img_size=16)  # num_templates = depth: a plain network
FULL_MODEL = dict(PLAIN, depth=6, num_templates=6, width=24, exp_ratio=3.0)
QUICK_MODEL = dict(PLAIN, depth=3, num_templates=3, width=12, exp_ratio=2.0)
FULL_DATA = dict(pretrain="cifar10", vectors=["mnist", "fashion_mnist", "mnist_m"], target="usps")
QUICK_DATA = dict(
    pretrain="synth_position", vectors=["synth_color", "synth_size"], target="synth_shape"
)
FULL = dict(
    model="modnet_conv_tiny", epochs=4, train_limit=10000, test_limit=1000, batch_size=64, lr=5e-3
)
QUICK = dict(
    model="modnet_conv_tiny", epochs=1, train_limit=256, test_limit=64, batch_size=32, lr=1e-2
)
FINETUNE_EPOCHS, FINETUNE_LIMIT = 2, 3000
FULL_SHOTS, QUICK_SHOTS = (5, 20), (4,)
ADDITION_SHOTS = 10
FULL_STEPS, QUICK_STEPS = 100, 10
HEAD_LR, COEFFICIENT_LR, BACKBONE_LR = 1e-2, 5e-2, 2e-3
LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
FEW_SHOT_METHODS = ("head only", "isotropic + head", "anisotropic + head", "full fine-tuning")


def accuracy(model: torch.nn.Module, task: TaskData) -> float:
    """Test accuracy."""
    return evaluate(model, {task.name: task})[task.name]


@torch.no_grad()
def labelled_accuracy(model: torch.nn.Module, task: TaskData) -> float:
    """Accuracy on the labelled training images: what a method may tune itself on."""
    x, y = batch(task)
    return float((model.eval()(x, task=task.name).argmax(-1) == y).float().mean())


def batch(task: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    return task.normalize(task.train_x), task.train_y


# ------------------------------------------------------------------------ task vectors
def pretrain_and_vectors(args, seed: int, out: Path):
    """The pretrained model, and one fine-tuned model and task vector per vector task."""
    names = QUICK_DATA if args.quick else FULL_DATA
    config = base_config(args, FULL, QUICK)
    config.seed, config.tasks = seed, [names["pretrain"]]
    config.model_kwargs = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    pretrained = train(config, out / "pretrain", overwrite=True)
    base = pretrained.model.eval()
    finetune = copy.copy(config)
    if not args.quick:
        finetune.epochs, finetune.train_limit = FINETUNE_EPOCHS, FINETUNE_LIMIT
    tuned, vectors = {}, {}
    for spec in names["vectors"]:
        run_dir = out / f"finetune-{spec}"
        io.save_checkpoint(run_dir, "pretrained", base)
        result = transfer(
            run_dir,
            spec,
            parts="templates,trunk,head",
            init_from=names["pretrain"],
            update_shared=True,  # a fine-tuned copy of the pretrained model: its task vector
            config=finetune,
        )
        tuned[spec] = (result.model.eval(), result.accuracy[spec])
        vectors[spec] = TaskVector.from_models(base, result.model, exclude=("heads.",))
    return base, pretrained.accuracy, tuned, vectors


# --------------------------------------------------------------------------- few-shot
def few_shot(base, source: str, vectors, target: TaskData, method: str, steps: int) -> float:
    """Accuracy on ``target`` after training ``method``'s parameters on its few labels."""
    model = copy.deepcopy(base)
    model.add_task(target.name, target.num_classes, init_from=source)
    model.freeze_norm_stats(True).eval()
    x, y = batch(target)
    if method in ("isotropic + head", "anisotropic + head"):
        composer = TaskVectorComposer(model, vectors, anisotropic=method.startswith("aniso"))
        head = model.heads[target.name].requires_grad_(True)
        groups = [
            dict(params=[composer.coefficients], lr=COEFFICIENT_LR),
            dict(params=list(head.parameters()), lr=HEAD_LR),
        ]
        fit(lambda step: F.cross_entropy(composer(x, task=target.name), y), groups, steps)
        return accuracy(composer.merged(), target)
    model.requires_grad_(method == "full fine-tuning")
    head = model.heads[target.name].requires_grad_(True)
    groups = [dict(params=list(head.parameters()), lr=HEAD_LR)]
    if method == "full fine-tuning":
        backbone = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
        groups.append(dict(params=backbone, lr=BACKBONE_LR))
    fit(lambda step: F.cross_entropy(model(x, task=target.name), y), groups, steps)
    return accuracy(model, target)


# ---------------------------------------------------------------------- task addition
def task_addition(base, source: str, tuned, vectors, few: dict[str, TaskData], steps: int):
    """Accuracy of one merged model on every vector task, per way of choosing coefficients."""
    merged = copy.deepcopy(base)
    for name, (model, _) in tuned.items():
        merged.add_task(name, few[name].num_classes, init_from=source)
        merged.heads[name].load_state_dict(model.heads[name].state_dict())
    merged.freeze_norm_stats(True).eval()
    count = len(vectors)

    def labelled(value: float) -> float:
        final = TaskVectorComposer(merged, vectors, anisotropic=False, init=value).merged()
        return sum(labelled_accuracy(final, task) for task in few.values()) / len(few)

    def loss(composer: TaskVectorComposer, supervised: bool) -> torch.Tensor:
        total = 0.0
        for name, task in few.items():
            x, y = batch(task)
            logits = composer(x, task=name)
            if supervised:
                total = total + F.cross_entropy(logits, y)
            else:
                total = total + prediction_entropy(logits, balance=1.0)
        return total / len(few)

    results = {
        "uniform 1/K": TaskVectorComposer(merged, vectors, anisotropic=False, init=1 / count)
    }
    best = max(LAMBDAS, key=labelled)
    results["uniform, best λ on the labelled images"] = TaskVectorComposer(
        merged, vectors, anisotropic=False, init=best
    )
    for label, anisotropic, supervised in (
        ("learned isotropic", False, True),
        ("learned anisotropic", True, True),
        ("learned anisotropic, no labels (balanced entropy)", True, False),
    ):
        composer = TaskVectorComposer(merged, vectors, anisotropic=anisotropic, init=1.0 / count)
        fit(
            lambda step, c=composer, s=supervised: loss(c, s),
            [composer.coefficients],
            steps,
            lr=COEFFICIENT_LR,
        )
        results[label] = composer
    return results, best


# ------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = parser(
        "aTLAS: few-shot learning and task addition with task vectors", "runs/experiments/atlas"
    )
    args = p.parse_args(argv)
    names = QUICK_DATA if args.quick else FULL_DATA
    shots_list = QUICK_SHOTS if args.quick else FULL_SHOTS
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    img_size = (QUICK_MODEL if args.quick else FULL_MODEL)["img_size"]
    test_limit = (QUICK if args.quick else FULL)["test_limit"]
    out = Path(args.out)
    few_acc = {s: {m: [] for m in FEW_SHOT_METHODS} for s in shots_list}
    addition: dict[str, dict[str, list[float]]] = {}
    individual = {t: [] for t in names["vectors"]}
    pretrain_acc, seconds, chosen = [], {}, []
    for seed in seeds(args):

        def load(spec: str, per_class: int, seed: int = seed) -> TaskData:
            """``per_class`` labelled training images per class (the real datasets here all
            have 10 classes), and the test split."""
            classes = len(parse_synthetic_spec(spec).classes) if spec.startswith("synth") else 10
            return load_task(
                spec,
                img_size=img_size,
                in_chans=3,
                root=args.data_root,
                train_limit=per_class * classes,
                test_limit=test_limit,
                seed=seed + 100,
            )

        start = time.perf_counter()
        base, pre_acc, tuned, vectors = pretrain_and_vectors(args, seed, out / f"seed{seed}")
        seconds["pretraining and fine-tuning"] = time.perf_counter() - start
        pretrain_acc.append(pre_acc[names["pretrain"]])
        for shots in shots_list:
            target = load(names["target"], shots)
            for method in FEW_SHOT_METHODS:
                start = time.perf_counter()
                acc = few_shot(base, names["pretrain"], vectors, target, method, steps)
                seconds[f"{shots}-shot {method}"] = time.perf_counter() - start
                few_acc[shots][method].append(acc)
                print(f"seed {seed}, {shots}-shot, {method}: {acc:.3f}", flush=True)
        start = time.perf_counter()
        few = {spec: load(spec, ADDITION_SHOTS) for spec in names["vectors"]}
        for spec, (model, _) in tuned.items():
            individual[spec].append(accuracy(model, few[spec]))
        results, best = task_addition(base, names["pretrain"], tuned, vectors, few, steps)
        chosen.append(best)
        for label, composer in results.items():
            final = composer.merged()
            accs = {spec: accuracy(final, task) for spec, task in few.items()}
            for spec, acc in accs.items():
                addition.setdefault(label, {}).setdefault(spec, []).append(acc)
            print(f"seed {seed}, addition, {label}: {accs}", flush=True)
        seconds["task addition"] = time.perf_counter() - start
    extra = dict(seconds=seconds, best_lambda=chosen)
    return report(args, argv, names, shots_list, few_acc, addition, individual, pretrain_acc, extra)


def report(args, argv, names, shots_list, few_acc, addition, individual, pretrain_acc, extra):
    seconds = extra["seconds"]
    target = names["target"]
    rows = [
        [method, *[cell(few_acc[s][method]) for s in shots_list]] for method in FEW_SHOT_METHODS
    ]
    header = ["trained", *[f"{target}, {s} labels per class (%)" for s in shots_list]]
    few_table = markdown_table(header, rows)
    tasks = names["vectors"]
    rows = [["each fine-tuned model on its own task", *[cell(individual[t]) for t in tasks], ""]]
    for label, per_task in addition.items():
        normalized = [
            sum(per_task[t][i] / individual[t][i] for t in tasks) / len(tasks)
            for i in range(len(per_task[tasks[0]]))
        ]
        rows.append([label, *[cell(per_task[t]) for t in tasks], cell(normalized)])
    addition_table = markdown_table(
        ["coefficients", *[f"{t} (%)" for t in tasks], "normalised accuracy (%)"], rows
    )
    note = (
        f"Mean ± std over seeds {seeds(args)}. Pretrained on {names['pretrain']} "
        f"(test accuracy {cell(pretrain_acc)}%); task vectors from {', '.join(tasks)}. "
        "Normalised accuracy: the merged model's accuracy over each fine-tuned model's, "
        f"averaged over tasks. Best λ per seed: {extra['best_lambda']}. "
        "Wall time of the last seed: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + "."
    )
    command = command_line(__file__, argv)
    sections = [
        f"## Few-shot learning of {target} (test accuracy, %)",
        few_table,
        "## Task addition: one model for all vector tasks (test accuracy, %)",
        addition_table,
        note,
    ]
    data = dict(
        few_shot={str(s): v for s, v in few_acc.items()},
        addition=addition,
        individual=individual,
        pretrain=pretrain_acc,
        seconds=seconds,
        best_lambda=extra["best_lambda"],
        seeds=seeds(args),
        names=names,
    )
    write_results(
        Path(args.out),
        "aTLAS: learned anisotropic scaling of task vectors",
        sections,
        data,
        command,
    )
    print(few_table)
    print(addition_table)
    print(note)
    return data


if __name__ == "__main__":
    main()
