"""The multi-task schedule: a pure function of the step, covering every sample."""

import pytest
import torch

from modnet.train.schedule import MultiTaskSchedule, cosine_schedule


def test_mixed_epoch_visits_every_sample_of_every_task_once():
    schedule = MultiTaskSchedule([10, 7, 5], batch_size=4, mode="mixed", seed=3)
    seen = {0: [], 1: [], 2: []}
    for step in range(schedule.steps_per_epoch):
        for task, indices in schedule.batch(step):
            seen[task] += indices.tolist()
    for task, size in enumerate([10, 7, 5]):
        assert sorted(seen[task]) == list(range(size))
    assert schedule.steps_per_epoch == 6


def test_batches_are_deterministic_and_reshuffled_every_epoch():
    a = MultiTaskSchedule([50, 30], 8, seed=1)
    b = MultiTaskSchedule([50, 30], 8, seed=1)
    for step in (0, 5, 11, 23):
        for (ta, ia), (tb, ib) in zip(a.batch(step), b.batch(step), strict=True):
            assert ta == tb and torch.equal(ia, ib)
    first = torch.cat([i for _, i in a.batch(0)])
    next_epoch = torch.cat([i for _, i in a.batch(a.steps_per_epoch)])
    assert not torch.equal(first, next_epoch)
    other_seed = MultiTaskSchedule([50, 30], 8, seed=2)
    assert not torch.equal(first, torch.cat([i for _, i in other_seed.batch(0)]))


def test_ranks_split_each_batch_without_overlap():
    schedule = MultiTaskSchedule([40, 24], 8, seed=0)
    for step in range(5):
        whole = {(t, i) for t, idx in schedule.batch(step) for i in idx.tolist()}
        parts = [
            {(t, i) for t, idx in schedule.batch(step, rank, 2) for i in idx.tolist()}
            for rank in range(2)
        ]
        assert parts[0] | parts[1] == whole and not parts[0] & parts[1]


def test_alternate_mode_cycles_tasks_with_full_batches():
    schedule = MultiTaskSchedule([9, 20, 6], 4, mode="alternate", seed=0)
    tasks = [schedule.batch(step)[0][0] for step in range(6)]
    assert tasks == [0, 1, 2, 0, 1, 2]
    for step in range(30):
        ((task, indices),) = schedule.batch(step)
        assert len(indices) == 4 and int(indices.max()) < [9, 20, 6][task]
    # one pass of a task's stream covers its samples before repeating any
    stream = torch.cat([schedule.batch(step)[0][1] for step in range(2, 2 + 3 * 3, 3)])[:6]
    assert sorted(stream.tolist()) == list(range(6))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown mixing mode"):
        MultiTaskSchedule([3], 2, mode="interleaved")
    with pytest.raises(ValueError, match="every task needs training samples"):
        MultiTaskSchedule([3, 0], 2)


def test_learning_rate_warms_up_then_decays_toward_zero_per_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(
        [dict(params=params[:1], lr=1.0), dict(params=params[1:], lr=0.1)]
    )
    schedule = cosine_schedule(optimizer, total_steps=100, warmup_steps=10)
    rates = []
    for step in range(100):
        schedule.step_update(step + 1)
        rates.append([g["lr"] for g in optimizer.param_groups])
    assert rates[0] == pytest.approx([0.1, 0.01]) and rates[9] == pytest.approx([1.0, 0.1])
    assert all(a[0] >= b[0] for a, b in zip(rates[9:], rates[10:], strict=False))
    assert 0 < rates[-1][0] < 1e-3 and rates[50][1] == pytest.approx(0.1 * rates[50][0])
    # the schedule is a function of the step: a fresh one restored from state agrees
    again = cosine_schedule(optimizer, total_steps=100, warmup_steps=10)
    again.load_state_dict(schedule.state_dict())
    again.step_update(38)
    assert optimizer.param_groups[0]["lr"] == rates[37][0]


def test_smallest_batch_is_the_last_of_a_mixed_epoch():
    assert MultiTaskSchedule([10, 7], 4).smallest_batch == 1
    assert MultiTaskSchedule([10, 6], 4).smallest_batch == 4
    assert MultiTaskSchedule([10, 7], 4, mode="alternate").smallest_batch == 4


def test_a_run_too_short_to_anneal_logs_nothing(caplog):
    import logging

    from modnet.train import cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with caplog.at_level(logging.DEBUG):
        cosine_schedule(optimizer, total_steps=1)
        logging.getLogger("timm.scheduler.cosine_lr").warning("other messages still pass")
    assert [r.getMessage() for r in caplog.records] == ["other messages still pass"]
