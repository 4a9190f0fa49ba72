"""The model's Python API keeps its promises after changes: added tasks, growth, loads.

A task added to a converted model runs in its dtype; only the tasks ``set_trainable``
names move their statistics; ``grow`` refuses a bad ``init`` before it changes the
pool; ``load_state_dict`` refuses a hard route no forward could run; parameters made
after ``set_trainable`` follow its selection.
"""

import pytest
import torch

from modnet.routing import SoftRoute
from tests.conftest import images, tiny_conv, tiny_vit

ROUTES = ["hyper", "softmax", "linear", "sparsemax", "hard"]


# ------------------------------------------------------------------ dtype of new tasks
@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_task_added_to_a_converted_model_takes_its_dtype(build, route, dtype):
    model = build(tasks={"a": 3}, route=route).to(dtype).eval()
    model.add_task("b", 2)
    model.add_task("c", 2, init_from="a")
    for task in ("b", "c"):
        floats = [t for t in model.routes[task].state_dict().values() if t.is_floating_point()]
        assert all(t.dtype == dtype for t in floats)
    x = images(model, 4).to(dtype)
    alone = model(x, task="b")
    assert alone.dtype == dtype
    mixed = model(x, task=[1, 0, 1, 0])
    assert mixed.dtype == dtype and torch.isfinite(mixed[:, :2]).all()


def test_a_float32_route_given_to_a_float64_model_keeps_every_digit():
    model = tiny_conv(tasks={"a": 3}, route="linear").double()
    coefficients = torch.rand(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.add_task("b", 2, route=coefficients)
    assert torch.equal(model.routes["b"].logits, coefficients)
    model.set_route("a", SoftRoute.from_coefficients(coefficients))
    assert torch.equal(model.routes["a"].logits, coefficients)
    # a route built in float32 is cast to the model's dtype, not left behind
    model.add_task("c", 2, route=SoftRoute(4, 3, normalize="softmax"))
    assert model.routes["c"].logits.dtype == torch.float64
    configured = model.routes["a"].configured(normalize="softmax", temperature=0.5)
    assert torch.equal(configured.logits, coefficients)
