"""Second-order compositionality and incremental learning (Porrello et al. 2025), small scale.

A plain convnet (``modnet_conv_tiny``, one template per layer, identity hard
route) is pretrained on one dataset; then tasks arrive one at a time, each with
its own head (task-incremental). Every task gets a *module*: a task vector
trained from the pretrained weights ``theta_0``. When task t arrives, its head
is first fitted on the frozen pretrained features (linear probe), then the
diagonal Fisher at ``theta_0`` on task t is added to those of earlier tasks.
Four ways of training the module:

- individual: fine-tune ``theta_0 + tau_t`` on task t alone;
- individual + Fisher (ITA): the same plus ``lambda * individual_penalty(tau_t, F)``;
- ensemble: train ``tau_t`` through the composed model ``theta_0 + mean(tau_1..tau_t)``,
  earlier modules frozen;
- ensemble + Fisher (IEL): the same plus ``lambda * ensemble_penalty(tau_1..tau_t, F)``.

The composed model is ``theta_0 + mean_k tau_k`` with every task's head.
Unlearning a task removes its module from the average; specialising reweights it.

    python experiments/second_order.py --data-root ../shared/data  # runs/experiments/second_order
    python experiments/second_order.py --quick
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

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
from modnet.compose import (  # noqa: E402
    TaskVector,
    diagonal_fisher,
    ensemble_penalty,
    fit,
    individual_penalty,
)
from modnet.data import TaskData, load_task  # noqa: E402
from modnet.train import evaluate, train  # noqa: E402

PLAIN = dict(route="hard", img_size=16)
FULL_MODEL = dict(PLAIN, depth=6, num_templates=6, width=24, exp_ratio=3.0)
QUICK_MODEL = dict(PLAIN, depth=3, num_templates=3, width=12, exp_ratio=2.0)
# the first task, the one unlearned, is the only one of its kind: no other module knows it
FULL_DATA = dict(pretrain="cifar10", tasks=["fashion_mnist", "mnist", "usps"])
QUICK_DATA = dict(pretrain="synth_position", tasks=["synth_color", "synth_size", "synth_shape"])
FULL = dict(
    model="modnet_conv_tiny", epochs=4, train_limit=10000, test_limit=1000, batch_size=64, lr=5e-3
)
QUICK = dict(
    model="modnet_conv_tiny", epochs=1, train_limit=256, test_limit=64, batch_size=32, lr=1e-2
)
FULL_SCHEDULE = dict(task_limit=2000, probe_steps=60, steps=150, fisher_samples=256)
QUICK_SCHEDULE = dict(task_limit=128, probe_steps=5, steps=8, fisher_samples=16)
BATCH, LR, HEAD_LR = 64, 2e-3, 1e-2
PENALTY = 1.0  # lambda, with the Fisher normalised to mean 1
METHODS = ("individual", "individual + Fisher (ITA)", "ensemble", "ensemble + Fisher (IEL)")


def batches(task: TaskData, seed: int):
    """A sampler of normalised training batches (with replacement across steps)."""
    generator = torch.Generator().manual_seed(seed)

    def sample(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(
            len(task.train_y), (min(BATCH, len(task.train_y)),), generator=generator
        )
        return task.normalize(task.train_x[index]), task.train_y[index]

    return sample


def probe_loss(model, name: str, sample):
    def loss(step: int) -> torch.Tensor:
        x, y = sample(step)
        return F.cross_entropy(model(x, task=name), y)

    return loss


def body(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("heads.")]


def train_module(method, base, carrier, name, task, previous, fisher, schedule, seed):
    """Trains task ``name``'s module and head; returns the module (a task vector)."""
    model = copy.deepcopy(carrier)
    model.requires_grad_(False)
    params = body(model) + list(model.heads[name].parameters())
    for p in params:
        p.requires_grad_(True)
    sample = batches(task, seed)
    ensemble = method.startswith("ensemble")
    penalised = "Fisher" in method

    def loss(step: int) -> torch.Tensor:
        x, y = sample(step)
        tau = TaskVector.from_models(base, model, exclude=("heads.",), detach=False)
        if ensemble:  # through the composed model; earlier modules are constants
            composed = TaskVector.mean([*previous, tau])
            logits = functional_call(model, composed.weights(base), (x,), {"task": name})
        else:
            logits = model(x, task=name)
        value = F.cross_entropy(logits, y)
        if penalised and ensemble and previous:
            value = value + PENALTY * ensemble_penalty([*previous, tau], fisher)
        elif penalised and not ensemble:
            value = value + PENALTY * individual_penalty(tau, fisher)
        return value

    groups = [
        dict(params=body(model), lr=LR),
        dict(params=list(model.heads[name].parameters()), lr=HEAD_LR),
    ]
    fit(loss, groups, schedule["steps"])
    carrier.heads[name].load_state_dict(model.heads[name].state_dict())
    return TaskVector.from_models(base, model, exclude=("heads.",))


def composed_accuracy(carrier, modules: dict[str, TaskVector], data, weights=None) -> dict:
    """Accuracy on every task of ``theta_0 + weighted mean of modules`` with each task's head."""
    names = list(modules)
    model = TaskVector.mean([modules[n] for n in names], weights).apply(copy.deepcopy(carrier))
    return evaluate(model, data)


def run_seed(args, seed: int, out: Path) -> dict:
    names = QUICK_DATA if args.quick else FULL_DATA
    schedule = QUICK_SCHEDULE if args.quick else FULL_SCHEDULE
    config = base_config(args, FULL, QUICK)
    config.seed, config.tasks = seed, [names["pretrain"]]
    config.model_kwargs = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    started = time.perf_counter()
    base = train(config, out / "pretrain", overwrite=True).model.eval()
    base.freeze_norm_stats(True)
    seconds = {"pretraining": time.perf_counter() - started}
    size = config.model_kwargs["img_size"]
    data = {
        spec: load_task(
            spec,
            img_size=size,
            in_chans=3,
            root=args.data_root,
            train_limit=schedule["task_limit"],
            test_limit=config.test_limit,
            seed=seed,
        )
        for spec in names["tasks"]
    }
    carriers = {m: copy.deepcopy(base) for m in METHODS}  # each method's heads
    modules: dict[str, dict[str, TaskVector]] = {m: {} for m in METHODS}
    fisher = None
    started = time.perf_counter()
    for index, (name, task) in enumerate(data.items()):
        # the new task's head on the frozen pretrained features, then its Fisher at theta_0
        base.add_task(name, task.num_classes, init_from=names["pretrain"])
        base.requires_grad_(False)
        head = base.heads[name].requires_grad_(True)
        fit(
            probe_loss(base, name, batches(task, seed + index)),
            head.parameters(),
            schedule["probe_steps"],
            lr=HEAD_LR,
        )
        head.requires_grad_(False)
        x = task.normalize(task.train_x[: schedule["fisher_samples"]])
        names_body = [n for n, _ in base.named_parameters() if not n.startswith("heads.")]
        task_fisher = diagonal_fisher(base, x, names=names_body, model_kwargs={"task": name})
        fisher = task_fisher if fisher is None else fisher + task_fisher
        normalized = fisher.normalized()
        for method in METHODS:
            carriers[method].add_task(name, task.num_classes, init_from=names["pretrain"])
            carriers[method].heads[name].load_state_dict(head.state_dict())
            previous = list(modules[method].values())
            modules[method][name] = train_module(
                method, base, carriers[method], name, task, previous, normalized, schedule, seed
            )
        print(f"seed {seed}: task {name} learned by every method", flush=True)
    seconds["incremental tasks (4 methods)"] = time.perf_counter() - started
    return evaluate_all(carriers, modules, data, seconds)


def evaluate_all(carriers, modules, data, seconds) -> dict:
    started = time.perf_counter()
    tasks = list(data)
    removed = tasks[0]
    result = {}
    for method in METHODS:
        carrier, own = carriers[method], modules[method]
        individual = {
            name: evaluate(own[name].apply(copy.deepcopy(carrier)), {name: data[name]})[name]
            for name in tasks
        }
        composed = composed_accuracy(carrier, own, data)
        rest = {n: v for n, v in own.items() if n != removed}
        unlearned = composed_accuracy(carrier, rest, data)
        weights = [2.0 / (len(tasks) + 1) if n == removed else 1.0 / (len(tasks) + 1) for n in own]
        specialised = composed_accuracy(carrier, own, data, weights)
        # every module removed: the pretrained weights with each task's trained head
        pretrained = evaluate(carrier, data)
        result[method] = dict(
            individual=individual,
            composed=composed,
            unlearned=unlearned,
            specialised=specialised,
            pretrained=pretrained,
        )
    seconds["evaluation"] = time.perf_counter() - started
    return dict(result=result, seconds=seconds, removed=removed)


def main(argv=None) -> dict:
    p = parser(
        "Porrello et al. 2025: second-order compositionality and incremental learning",
        "runs/experiments/second_order",
    )
    args = p.parse_args(argv)
    names = QUICK_DATA if args.quick else FULL_DATA
    out = Path(args.out)
    runs = [run_seed(args, seed, out / f"seed{seed}") for seed in seeds(args)]
    tasks = names["tasks"]
    removed = runs[0]["removed"]

    def values(method: str, kind: str, task: str | None = None) -> list[float]:
        if task is None:  # the mean over tasks
            return [sum(r["result"][method][kind].values()) / len(tasks) for r in runs]
        return [r["result"][method][kind][task] for r in runs]

    rows = []
    for method in METHODS:
        rows.append(
            [
                method,
                cell(values(method, "individual")),
                *[cell(values(method, "composed", t)) for t in tasks],
                cell(values(method, "composed")),
            ]
        )
    composition = markdown_table(
        [
            "modules trained",
            "each module alone (mean)",
            *[f"composed: {t}" for t in tasks],
            "composed: mean",
        ],
        rows,
    )
    others = [t for t in tasks if t != removed]

    def others_mean(method: str, kind: str) -> list[float]:
        return [sum(r["result"][method][kind][t] for t in others) / len(others) for r in runs]

    rows = [
        [
            method,
            cell(values(method, "composed", removed)),
            cell(values(method, "unlearned", removed)),
            cell(values(method, "specialised", removed)),
            cell(values(method, "pretrained", removed)),
            cell(others_mean(method, "composed")),
            cell(others_mean(method, "unlearned")),
            cell(others_mean(method, "specialised")),
        ]
        for method in METHODS
    ]
    editing = markdown_table(
        [
            "modules trained",
            f"{removed}: composed",
            f"{removed}: module removed",
            f"{removed}: specialised",
            f"{removed}: no module (θ0 + its head)",
            "other tasks: composed",
            "other tasks: module removed",
            "other tasks: specialised",
        ],
        rows,
    )
    seconds = runs[-1]["seconds"]
    note = (
        f"Test accuracy (%), mean ± std over seeds {seeds(args)}. Pretrained on "
        f"{names['pretrain']}; tasks arrive in the order {', '.join(tasks)}, one head each. "
        f"Penalty weight λ = {PENALTY} with the accumulated Fisher normalised to mean 1. "
        f"Specialised: {removed}'s module weighted twice the others. Wall time of the last "
        "seed: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."
    )
    command = command_line(__file__, argv)
    sections = [
        "## Composition: individual modules and their average",
        composition,
        f"## Editing the composed model: unlearning and specialising {removed}",
        editing,
        note,
    ]
    data = dict(runs=runs, seeds=seeds(args), names=names, penalty=PENALTY)
    write_results(
        out, "Second-order compositionality and incremental learning", sections, data, command
    )
    print(composition)
    print(editing)
    print(note)
    return data


if __name__ == "__main__":
    main()
