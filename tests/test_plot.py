"""Figures: route heatmaps and learning curves, drawn with matplotlib."""

import json

import pytest
import torch
from conftest import tiny_conv
from PIL import Image

from modnet.plot import (
    curves_figure,
    magnitude_shares,
    read_metrics,
    route_figure,
    route_kind,
    route_matrix,
    route_table,
    save_learning_curves,
    save_route_figures,
)


def model_with_tasks():
    model = tiny_conv()  # 4 layers, 3 templates
    model.add_task("fashion_mnist", 10)
    model.add_task("hard_task", 3, route=[2, 0, 1, 2])
    return model


def test_route_matrix_rows_are_template_shares():
    model = model_with_tasks()
    soft = route_matrix(model, "fashion_mnist")
    expected = model.routes["fashion_mnist"].logits.detach().softmax(1)
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))
    hard = route_matrix(model, "hard_task")
    assert hard.argmax(1).tolist() == [2, 0, 1, 2] and hard.sum().item() == 4.0
    assert route_kind(model, "fashion_mnist") == "softmax"
    assert route_kind(model, "hard_task") == "hard"


def test_route_figure_has_full_names_axes_colour_bar_and_route_kind():
    model = model_with_tasks()
    matrices = {t: route_matrix(model, t) for t in model.task_names}
    figure = route_figure(matrices, {t: route_kind(model, t) for t in model.task_names})
    panels, bar = figure.axes[:2], figure.axes[2]
    assert len(figure.axes) == 3  # two heatmaps and the colour bar
    assert [ax.get_title() for ax in panels] == ["fashion_mnist\n(softmax)", "hard_task\n(hard)"]
    assert [ax.get_xlabel() for ax in panels] == ["template", "template"]
    assert panels[0].get_ylabel() == "layer"
    assert bar.get_ylabel() == "share of the layer's weight"
    image = panels[1].images[0]
    assert image.get_clim() == (0.0, 1.0)
    assert image.get_array().tolist() == matrices["hard_task"].tolist()
    same_kind = route_figure({"a": matrices["fashion_mnist"]}, "softmax")
    assert same_kind.get_suptitle().endswith("(softmax route)")
    assert same_kind.axes[0].get_title() == "a"


def test_linear_routes_show_as_magnitude_shares_and_the_table_says_so(tmp_path):
    model = model_with_tasks()
    signed = torch.tensor([[1.5, -0.5, 0.0]] * 4)
    model.add_task("linear", 3, route=signed)
    torch.testing.assert_close(route_matrix(model, "linear"), torch.tensor([[0.75, 0.25, 0.0]] * 4))
    # anisotropic: opposite signs across tensors do not cancel
    tensors = model.pool.num_tensors
    aniso = torch.zeros(4, 3, tensors)
    aniso[:, 0, 0], aniso[:, 0, 1], aniso[:, 1, :] = 1.0, -1.0, 0.5
    model.add_task("aniso", 3, route=aniso)
    expected = torch.tensor([2 / tensors, 0.5, 0.0]) / (2 / tensors + 0.5)
    torch.testing.assert_close(route_matrix(model, "aniso"), expected.expand(4, 3))
    shares = [t for t in model.task_names if magnitude_shares(model, t)]
    assert shares == ["linear", "aniso"]  # softmax and hard routes are their coefficients
    _, txt = save_route_figures(model, tmp_path)
    table = txt.read_text()
    assert table == route_table({t: route_matrix(model, t) for t in model.task_names}, shares)
    heading = table.split("task linear\n")[1].splitlines()[0]
    assert heading == (
        "(shares of |coefficient| per layer: the signed coefficients are "
        "model.routes['linear'].plan(model.hypernet).coefficients)"
    )
    assert "(shares of" not in table.split("task linear")[0]


def test_save_route_figures_writes_a_png_and_the_table(tmp_path):
    model = model_with_tasks()
    png, txt = save_route_figures(model, tmp_path / "out")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 150
    table = txt.read_text()
    assert "task fashion_mnist" in table and "task hard_task" in table
    assert table == route_table({t: route_matrix(model, t) for t in model.task_names})
    hard_rows = table.split("task hard_task")[1].strip().splitlines()[1:]
    assert [row.split()[-1] for row in hard_rows] == ["T2", "T0", "T1", "T2"]


def write_metrics(path, records, torn=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"phase": "tr' if torn else ""))


RECORDS = [
    dict(phase="train", step=2, epoch=0.5, loss=2.0, lr=1e-3, samples_per_s=100.0),
    dict(phase="train", step=4, epoch=1.0, loss=1.5, lr=5e-4, samples_per_s=100.0),
    dict(phase="train", step=4, epoch=1.0, accuracy={"a": 0.5, "b": 0.25}),
    dict(phase="transfer-c", step=3, epoch=1.0, loss=1.0, lr=2e-4, samples_per_s=90.0),
    dict(phase="transfer-c", step=3, epoch=1.0, accuracy={"c": 0.75}),
]


def test_read_metrics_keeps_the_last_of_a_resumed_record_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    resumed = dict(RECORDS[1], loss=1.25)
    write_metrics(path, [*RECORDS[:2], resumed, *RECORDS[2:]], torn=True)
    records = read_metrics(path)
    assert len(records) == len(RECORDS)
    assert [r.get("loss") for r in records] == [2.0, 1.25, None, 1.0, None]


def test_read_metrics_keeps_only_the_last_fresh_start_of_each_phase(tmp_path):
    path = tmp_path / "metrics.jsonl"
    longer = [
        dict(phase="transfer-c", step=s, epoch=s / 3, loss=9.0, lr=1e-4, samples_per_s=1.0)
        for s in (3, 6)
    ]
    start = dict(phase="transfer-c", event="start")
    write_metrics(path, [dict(phase="train", event="start"), *RECORDS[:3], start, *longer])
    assert [r["loss"] for r in read_metrics(path) if r["phase"] == "transfer-c"] == [9.0, 9.0]
    write_metrics(path, [*RECORDS[:3], start, *longer, start, *RECORDS[3:]])
    assert read_metrics(path) == RECORDS  # step 6 of the replaced attempt is gone
    # ``modnet discard`` drops the last attempt: the one before it counts again
    discarded = dict(phase="transfer-c", event="discarded")
    write_metrics(path, [*RECORDS[:3], start, *longer, start, RECORDS[3], discarded])
    assert read_metrics(path) == [*RECORDS[:3], *longer]
    write_metrics(path, [*RECORDS[:3], start, *longer, discarded, discarded])
    assert read_metrics(path) == RECORDS[:3]


def test_read_metrics_keeps_the_attempt_the_run_holds_until_a_retry_checkpoints(tmp_path):
    path = tmp_path / "metrics.jsonl"
    retry = [
        dict(phase="transfer-c", step=s, epoch=s / 3, loss=9.0, lr=1e-4, samples_per_s=1.0)
        for s in (3, 6)
    ]
    start = dict(phase="transfer-c", event="start")
    mark = dict(phase="transfer-c", event="checkpoint", step=3)
    first = [dict(phase="train", event="start"), *RECORDS[:3], start, *RECORDS[3:], mark]
    write_metrics(path, [*first, start, *retry])  # the retry saved no checkpoint
    assert read_metrics(path) == RECORDS
    write_metrics(path, [*first, start, *retry, start])  # nor did the one after it
    assert read_metrics(path) == RECORDS
    write_metrics(path, [*first, start, *retry, mark])
    assert read_metrics(path) == [*RECORDS[:3], *retry]
    discarded = dict(phase="transfer-c", event="discarded")
    write_metrics(path, [*first, start, *retry, mark, discarded])
    assert read_metrics(path) == RECORDS
    # a phase none of whose attempts checkpointed yet shows its latest, as it trains
    write_metrics(path, [*RECORDS[:3], start, *RECORDS[3:], start, *retry])
    assert read_metrics(path) == [*RECORDS[:3], *retry]


def test_learning_curves_draw_loss_accuracy_and_lr_with_phases_in_sequence():
    figure = curves_figure(RECORDS)
    loss, accuracy, lr = figure.axes
    assert [ax.get_title() for ax in figure.axes] == ["training loss", "test accuracy", "lr"]
    train_loss, transfer_loss = loss.get_lines()[:2]
    assert train_loss.get_xdata().tolist() == [2, 4] and train_loss.get_ydata().tolist() == [2, 1.5]
    assert transfer_loss.get_xdata().tolist() == [7]  # the transfer starts at train's last step
    series = {line.get_label(): line for line in accuracy.get_lines() if line.get_label()[0] != "_"}
    assert series["a"].get_ydata().tolist() == [0.5] and series["c"].get_xdata().tolist() == [7]
    assert lr.get_lines()[0].get_ydata().tolist() == [1e-3, 5e-4]
    assert [line.get_xdata()[0] for line in loss.get_lines()[2:]] == [4]  # the phase boundary
    with pytest.raises(ValueError, match="no metrics"):
        curves_figure([])


def test_save_learning_curves_reads_a_run_directory(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", RECORDS)
    png = save_learning_curves(tmp_path)
    assert png == tmp_path / "curves.png"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        save_learning_curves(tmp_path / "empty")


def test_a_figure_redrawn_by_a_process_that_dies_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    model = model_with_tasks()
    png, txt = save_route_figures(model, tmp_path)
    before = png.read_bytes()

    def torn(self, path, **kwargs):  # half a file, then the process dies
        open(path, "wb").write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        save_route_figures(model, tmp_path)
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [png.name, txt.name]  # no leftover
