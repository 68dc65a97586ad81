"""TrainerState: the counters a checkpoint records, round-tripped as plain data; older checkpoints still load."""

from __future__ import annotations

import json

import pytest

from multitune.training.state import SNAPSHOT_KEYS, TrainerState

SNAPSHOTS = {"sampler": {"rng": [1, 2]}, "running": {"a": [0.5]}, "batchers": {"a": {"position": 3}}}


def test_state_round_trips_through_json_with_its_snapshots():
    state = TrainerState(step=7, best_value=0.81, best_step=6, bad_evals=1, examples=56, real_tokens=900,
                         padded_tokens=1200, train_seconds=3.5, bad_steps={"a": 2}, bad_in_a_row=0,
                         per_task_best={"a": {"step": 6, "score": 0.8, "metrics": {"accuracy": 0.8}}},
                         data_files={"/d/train.tsv": {"size": 10, "mtime": 1.0, "sha256": "ab"}})
    data = json.loads(json.dumps(state.state_dict(**SNAPSHOTS)))
    again, snapshots = TrainerState.from_state_dict(data)
    assert again == state and snapshots == SNAPSHOTS and set(SNAPSHOT_KEYS) <= set(data)


def test_a_checkpoint_from_before_the_guard_and_per_task_selection_loads():
    old = {"step": 4, "best_value": None, "best_step": None, "bad_evals": 0, "examples": 32, "real_tokens": 100,
           "padded_tokens": 128, "train_seconds": 1.0, **SNAPSHOTS}
    state, _ = TrainerState.from_state_dict(old)
    assert state.step == 4 and state.bad_steps == {} and state.per_task_best == {} and state.data_files is None


@pytest.mark.parametrize("damaged", [{"step": 3}, {**SNAPSHOTS, "step": "three"}, {**SNAPSHOTS}])
def test_damaged_state_raises_for_the_caller_to_name_the_file(damaged):
    with pytest.raises((KeyError, ValueError)):
        TrainerState.from_state_dict(damaged)


def test_compile_seconds_is_the_first_steps_extra_time():
    from multitune.training.callbacks import compile_seconds

    state = TrainerState(step=5, train_seconds=14.0)  # first step 10 s, then four of 1 s
    assert compile_seconds(10.0, 0, state) == 9.0
    assert compile_seconds(None, 0, state) is None and compile_seconds(10.0, 4, state) is None  # one step only
    resumed = TrainerState(step=11, train_seconds=20.0)  # 5 earlier steps of 1 s; here 6 s (compiling), then 1 s each
    assert compile_seconds(6.0, 5, resumed) == 4.6
