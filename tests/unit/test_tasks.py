"""Batch schedule of SPEC §3 and task loading."""

from metasft.data.tasks import BatchSchedule


def test_batches_are_without_replacement_within_a_pass():
    schedule = BatchSchedule(10, 3, seed=0, task="t", split="support")
    first_pass = [schedule.next_indices() for _ in range(3)]
    flat = [i for batch in first_pass for i in batch]
    assert len(flat) == len(set(flat)) == 9
    # The tenth row waits; the next batch starts a fresh shuffle.
    schedule.next_indices()
    assert schedule.epoch == 1


def test_whole_set_when_batch_at_least_set():
    schedule = BatchSchedule(5, 5, seed=0, task="t", split="query")
    assert schedule.next_indices() == list(range(5)) == schedule.next_indices()


def test_schedule_is_deterministic_and_resumable():
    a = BatchSchedule(17, 4, seed=7, task="t", split="support")
    b = BatchSchedule(17, 4, seed=7, task="t", split="support")
    for _ in range(6):
        a.next_indices()
        b.next_indices()
    state = a.state_dict()
    expected = [a.next_indices() for _ in range(5)]
    c = BatchSchedule(17, 4, seed=7, task="t", split="support")
    c.load_state_dict(state)
    assert [c.next_indices() for _ in range(5)] == expected == [b.next_indices() for _ in range(5)]


def test_schedules_differ_across_tasks_and_seeds():
    base = BatchSchedule(50, 5, seed=1, task="a", split="support").next_indices()
    assert BatchSchedule(50, 5, seed=1, task="b", split="support").next_indices() != base
    assert BatchSchedule(50, 5, seed=2, task="a", split="support").next_indices() != base
