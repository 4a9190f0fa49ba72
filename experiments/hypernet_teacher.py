"""Modular hypernetworks generalise compositionally (Schug et al. 2024), teacher-student.

The teacher's hidden layer (16 -> 32, ReLU) has weights ``sum_m z[m] * Theta_m``:
a ``TemplatePool`` of M = 6 ground-truth modules mixed by a 2-hot task code ``z``
(the two active modules weighted by draws from U(0.5, 1.5)); a fixed readout
sums groups of 4 hidden units into 8 outputs, so hidden units may swap places
within a group without changing a task. Training tasks use only some pairs of
modules (the *support*); the other pairs are never seen and test compositional
generalisation:

- ``connected``: 6 pairs forming a ring over the modules: every module is used
  and the pairs connect them all;
- ``disconnected``: the modules form two groups {0, 1, 2} and {3, 4, 5} that are
  never combined in training (6 pairs, all within a group);
- ``random``: 6 random pairs that use every module (their graph is usually,
  not always, connected: the table says).

The modular student is a modnet template pool of K = 12 hidden-layer blocks
mixed by a linear ``HyperNetwork`` of a 6-d task embedding, with the same fixed
readout. The non-modular student is an MLP with as many parameters that sees the
embedding concatenated to its input. Both learn the same way, first-order and
alternating, over 512 training tasks: each step takes 32 of them with fresh
samples; the inner step moves only their embeddings (on 32 support samples),
then the outer step moves only the shared weights (on 32 query samples) with
the embeddings fixed. At test time new tasks' embeddings are fitted from zero
(Adam, 200 steps) on 32 support samples with everything else frozen.

Reported: query MSE on new tasks of seen pairs (in support) and of unseen pairs
(out of support), their ratio, and module identification: the R-squared of a
least-squares linear map from fitted embeddings to the teacher's codes, fitted on
half of all test tasks and scored on the other half, and fitted on in-support
tasks and scored on out-of-support ones.

    python experiments/hypernet_teacher.py --out runs/experiments/hypernet_teacher
    python experiments/hypernet_teacher.py --quick
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    cell,
    command_line,
    markdown_table,
    parser,
    seeds,
    timed,
    write_results,
)
from modnet import HyperNetwork, TemplatePool  # noqa: E402
from modnet.compose import fit  # noqa: E402
from modnet.train.schedule import cosine_schedule  # noqa: E402

IN, HIDDEN, OUT = 16, 32, 8
MODULES, ACTIVE = 6, 2
EMBED = 6
SUPPORTS = ("connected", "disconnected", "random")
TEMPLATES = 12  # the student's modules: more than the teacher's, which eases learning
FULL = dict(outer_steps=3000, train_tasks=512, tasks_per_step=32, eval_tasks=96, eval_steps=200)
QUICK = dict(outer_steps=100, train_tasks=64, tasks_per_step=16, eval_tasks=24, eval_steps=30)
SHOTS, QUERY, EVAL_QUERY = 32, 32, 256
INNER_LR, OUTER_LR, EVAL_LR = 0.03, 3e-3, 0.1


def hidden_block() -> nn.Module:
    """What a module parameterises: the hidden layer."""
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU())


def readout(hidden: torch.Tensor) -> torch.Tensor:
    """Fixed readout: output j sums hidden units 4j..4j+3 (no parameters).

    Units that feed the same output can trade places in one task without changing
    it; only tasks that share a module tie those permutations together, which is
    what makes the connectedness of the training support matter.
    """
    return hidden.unflatten(-1, (OUT, HIDDEN // OUT)).sum(-1)


def run_pool(pool: TemplatePool, coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One mixed block per task: coefficients ``[B, K]``, inputs ``[B, N, IN]``."""
    weights = pool.mix(coefficients)  # the task axis plays the layer axis: [B, *shape]
    return vmap(lambda w, xs: pool.run(xs, w, {}))(weights, x)


class Teacher:
    """M ground-truth modules; a task's network is their mix by its code."""

    def __init__(self, generator: torch.Generator):
        blocks = [hidden_block() for _ in range(MODULES)]
        with torch.no_grad():
            for block in blocks:
                for p in block.parameters():
                    scale = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)
        self.pool = TemplatePool(blocks).requires_grad_(False)

    def __call__(self, codes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return readout(run_pool(self.pool, codes, x))


class ModularStudent(nn.Module):
    """A modnet template pool mixed by a linear hypernetwork of the task embedding."""

    def __init__(self, templates: int = TEMPLATES):
        super().__init__()
        self.pool = TemplatePool([hidden_block() for _ in range(templates)])
        self.hypernet = HyperNetwork(EMBED, depth=1, num_templates=templates)
        # modnet starts near the uniform mixture; here the embedding must steer the
        # mixture from the first step, so the map starts at unit scale
        nn.init.normal_(self.hypernet.net.weight, std=EMBED**-0.5)

    def forward(self, embedding: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        coefficients = vmap(self.hypernet)(embedding)[:, 0]  # [B, 1, K] -> [B, K]
        return readout(run_pool(self.pool, coefficients, x))


class MonolithicStudent(nn.Module):
    """An MLP that sees the embedding next to its input, as large as the modular student."""

    def __init__(self, parameters: int):
        super().__init__()
        # (IN + EMBED + 1) * h + (h + 1) * OUT = parameters
        hidden = round((parameters - OUT) / (IN + EMBED + 1 + OUT))
        self.net = nn.Sequential(nn.Linear(IN + EMBED, hidden), nn.ReLU(), nn.Linear(hidden, OUT))

    def forward(self, embedding: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        context = embedding[:, None, :].expand(-1, x.shape[1], -1)
        return self.net(torch.cat([x, context], dim=-1))


# --------------------------------------------------------------------- task supports
def support_pairs(kind: str, rng: random.Random) -> list[tuple[int, int]]:
    """The module pairs that training tasks use (see the module docstring)."""
    if kind == "connected":
        return sorted(tuple(sorted((m, (m + 1) % MODULES))) for m in range(MODULES))
    if kind == "disconnected":
        half = MODULES // 2
        groups = [range(half), range(half, MODULES)]
        return [pair for group in groups for pair in itertools.combinations(group, ACTIVE)]
    if kind == "random":
        pairs = list(itertools.combinations(range(MODULES), ACTIVE))
        while True:
            chosen = sorted(rng.sample(pairs, MODULES))
            if len({m for pair in chosen for m in pair}) == MODULES:
                return chosen
    raise ValueError(f"unknown support {kind!r}: choose one of {SUPPORTS}")


def is_connected(pairs: list[tuple[int, int]]) -> bool:
    reached, frontier = {0}, [0]
    while frontier:
        node = frontier.pop()
        for a, b in pairs:
            for u, v in ((a, b), (b, a)):
                if u == node and v not in reached:
                    reached.add(v)
                    frontier.append(v)
    return len(reached) == MODULES


def sample_codes(pairs: list[tuple[int, int]], count: int, generator: torch.Generator):
    choice = torch.randint(len(pairs), (count,), generator=generator)
    codes = torch.zeros(count, MODULES)
    for row, index in enumerate(choice.tolist()):
        for module in pairs[index]:
            codes[row, module] = 0.5 + torch.rand((), generator=generator)
    return codes


def make_tasks(teacher: Teacher, codes: torch.Tensor, shots: int, query: int, generator):
    x = torch.randn(len(codes), shots + query, IN, generator=generator)
    y = teacher(codes, x)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


# ------------------------------------------------------------------------- learning
def meta_train(student: nn.Module, teacher: Teacher, pairs, options: dict, generator) -> None:
    """Alternating first-order bilevel learning over a fixed set of training tasks.

    Every step takes a batch of training tasks and fresh samples of them: the inner
    step moves only those tasks' embeddings (on support samples), then the outer
    step moves only the shared weights (on query samples), embeddings held fixed.
    Embeddings persist between visits, so each inner step continues the last one.
    """
    codes = sample_codes(pairs, options["train_tasks"], generator)
    embeddings = torch.zeros(len(codes), EMBED, requires_grad=True)
    inner = torch.optim.Adam([embeddings], lr=INNER_LR)
    outer = torch.optim.Adam(student.parameters(), lr=OUTER_LR)
    steps = options["outer_steps"]
    schedule = cosine_schedule(outer, steps)
    for step in range(steps):
        schedule.step_update(step + 1)
        batch = torch.randint(len(codes), (options["tasks_per_step"],), generator=generator)
        xs, ys, xq, yq = make_tasks(teacher, codes[batch], SHOTS, QUERY, generator)
        student.requires_grad_(False)
        # summed over tasks: each embedding gets its own task's gradient
        loss = (student(embeddings[batch], xs) - ys).pow(2).mean(dim=(1, 2)).sum()
        inner.zero_grad()
        loss.backward()
        inner.step()
        student.requires_grad_(True)
        loss = (student(embeddings[batch].detach(), xq) - yq).pow(2).mean()
        outer.zero_grad()
        loss.backward()
        outer.step()


def fit_embeddings(student: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    """Test-time inner loop: new tasks' embeddings from zero, everything else frozen."""
    student.requires_grad_(False)
    embedding = torch.zeros(len(x), EMBED, requires_grad=True)

    def loss(step: int) -> torch.Tensor:
        return (student(embedding, x) - y).pow(2).mean(dim=(1, 2)).sum()

    fit(loss, [embedding], steps, lr=EVAL_LR, warmup=0.0, grad_clip=None)
    return embedding.detach()


def evaluate(student: nn.Module, teacher: Teacher, codes: torch.Tensor, steps: int, generator):
    """Per-task query MSE after fitting each task's embedding, and the embeddings."""
    xs, ys, xq, yq = make_tasks(teacher, codes, SHOTS, EVAL_QUERY, generator)
    embedding = fit_embeddings(student, xs, ys, steps)
    with torch.no_grad():
        loss = (student(embedding, xq) - yq).pow(2).mean(dim=(1, 2))
    return loss, embedding


def decoding_r2(embedding: torch.Tensor, codes: torch.Tensor, fit_rows, test_rows) -> float:
    """R-squared of a least-squares linear map embedding -> code, fitted and scored on rows."""
    design = torch.cat([embedding, torch.ones(len(embedding), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design[fit_rows], codes[fit_rows].double()).solution
    residual = codes[test_rows].double() - design[test_rows] @ solution
    centred = codes[test_rows].double() - codes[test_rows].double().mean(0)
    return float(1 - residual.pow(2).sum() / centred.pow(2).sum())


def run(kind: str, student_kind: str, seed: int, options: dict) -> dict:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    teacher = Teacher(generator)
    pairs = support_pairs(kind, rng)
    unseen = [p for p in itertools.combinations(range(MODULES), ACTIVE) if p not in pairs]
    modular = ModularStudent()
    student = modular if student_kind == "modular" else MonolithicStudent(count(modular))
    meta_train(student, teacher, pairs, options, generator)
    in_codes = sample_codes(pairs, options["eval_tasks"], generator)
    out_codes = sample_codes(unseen, options["eval_tasks"], generator)
    steps = options["eval_steps"]
    in_loss, in_embedding = evaluate(student, teacher, in_codes, steps, generator)
    out_loss, out_embedding = evaluate(student, teacher, out_codes, steps, generator)
    with torch.no_grad():
        zero_loss = make_tasks(teacher, out_codes, 0, EVAL_QUERY, generator)[3].pow(2).mean()
    embeddings, codes = torch.cat([in_embedding, out_embedding]), torch.cat([in_codes, out_codes])
    count_in = len(in_codes)
    shuffled = torch.randperm(len(codes), generator=generator)
    half = len(codes) // 2
    return dict(
        in_support=float(in_loss.mean()),
        out_of_support=float(out_loss.mean()),
        ratio=float(out_loss.mean() / in_loss.mean()),
        r2=decoding_r2(embeddings, codes, shuffled[:half], shuffled[half:]),
        r2_ood=decoding_r2(
            embeddings, codes, torch.arange(count_in), torch.arange(count_in, len(codes))
        ),
        zero_predictor=float(zero_loss),
        parameters=count(student),
        connected=is_connected(pairs),
        pairs=pairs,
    )


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def options(argv=None):
    """The experiment's options, checked; ``.steps``: its training schedule."""
    p = parser(
        "Schug et al. 2024: modular hypernetwork teacher-student",
        "runs/experiments/hypernet",
        training=False,
    )
    p.add_argument(
        "--outer-steps",
        type=int,
        help=f"meta-training steps (default: {FULL['outer_steps']}, {QUICK['outer_steps']} "
        "with --quick)",
    )
    args = p.parse_args(argv)
    args.steps = dict(QUICK if args.quick else FULL)
    if args.outer_steps is not None:
        if args.outer_steps < 1:
            p.error(f"--outer-steps must be at least 1, got {args.outer_steps}")
        args.steps["outer_steps"] = args.outer_steps
    return args


def main(argv=None) -> dict:
    args = options(argv)
    steps = args.steps
    results: dict[str, dict[str, list[dict]]] = {}
    elapsed = 0.0
    for kind in SUPPORTS:
        for student_kind in ("modular", "non-modular"):
            runs = []
            for seed in seeds(args):
                result, seconds = timed(lambda: run(kind, student_kind, seed, steps))  # noqa: B023
                elapsed += seconds
                runs.append(result)
                print(
                    f"{kind:12s} {student_kind:11s} seed {seed}: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)),
                    flush=True,
                )
            results.setdefault(kind, {})[student_kind] = runs
    header = [
        "support",
        "student",
        "in-support MSE",
        "out-of-support MSE",
        "OOD / in-support",
        "R² (held-out tasks)",
        "R² (fit in support, score out)",
        "params",
    ]
    rows = []
    for kind, by_student in results.items():
        for student_kind, runs in by_student.items():
            connected = sum(r["connected"] for r in runs)
            label = kind if kind != "random" else f"random ({connected}/{len(runs)} connected)"
            rows.append(
                [
                    label,
                    student_kind,
                    cell([r["in_support"] for r in runs], scale=1.0, digits=4),
                    cell([r["out_of_support"] for r in runs], scale=1.0, digits=4),
                    cell([r["ratio"] for r in runs], scale=1.0, digits=2),
                    cell([r["r2"] for r in runs], scale=1.0, digits=3),
                    cell([r["r2_ood"] for r in runs], scale=1.0, digits=3),
                    f"{runs[0]['parameters']:,}",
                ]
            )
    zero = [r["zero_predictor"] for by in results.values() for rs in by.values() for r in rs]
    table = markdown_table(header, rows)
    note = (
        f"Mean ± std over seeds {seeds(args)}. MSE of predicting zero (the teacher's output "
        f"scale): {sum(zero) / len(zero):.3f}. Training: {steps['outer_steps']} steps of "
        f"{steps['tasks_per_step']} of {steps['train_tasks']} training tasks; test: "
        f"{steps['eval_tasks']} new tasks per split. Total wall time {elapsed:.0f} s."
    )
    command = command_line(__file__, argv)
    sections = ["## Compositional generalisation, teacher-student", table, note]
    data = dict(results=results, seeds=seeds(args), options=steps, seconds=elapsed)
    write_results(Path(args.out), "Modular hypernetwork teacher-student", sections, data, command)
    print(table)
    print(note)
    return data


if __name__ == "__main__":
    main()
