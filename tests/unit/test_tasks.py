"""Batch schedule of SPEC §3 and task loading."""

import pytest

from metasft.errors import ConfigError
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


def test_per_class_shots_take_n_rows_of_every_class_seeded_and_name_a_short_class():
    from metasft.adapt import select_shots_per_class

    labels = ["red", "blue", "green"] * 5 + ["red"] * 3  # red 8 rows, blue and green 5 each
    chosen = select_shots_per_class(labels, 2, seed=0, task="t")
    assert chosen == sorted(chosen) and len(set(chosen)) == 6
    assert sorted(labels[i] for i in chosen) == ["blue", "blue", "green", "green", "red", "red"]
    assert chosen == select_shots_per_class(labels, 2, seed=0, task="t")  # seeded
    assert {tuple(select_shots_per_class(labels, 2, seed=s, task="t")) for s in range(6)} != {tuple(chosen)}
    # One class's draw does not depend on the other classes' rows.
    more = labels + ["yellow"] * 2
    assert [i for i in chosen if labels[i] == "red"] == \
        [i for i in select_shots_per_class(more, 2, seed=0, task="t") if more[i] == "red"]
    with pytest.raises(ConfigError, match="n_shots: 6 per class exceeds task 't'.s 5 support rows of class 'blue'"):
        select_shots_per_class(labels, 6, seed=0, task="t")
