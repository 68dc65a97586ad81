"""Task samplers: shares, determinism and exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from multitune.config.parse import from_dict
from multitune.sampling import SAMPLERS

SIZES = {"big": 9000, "mid": 900, "small": 100}


def make(name: str, **extra):
    cls = SAMPLERS.get(name)
    return cls(SIZES, from_dict(cls.config_class, {"strategy": name, **extra}), seed=3)


@pytest.mark.parametrize("name, expected", [
    ("proportional", {"big": 0.9, "mid": 0.09, "small": 0.01}),
    ("uniform", {"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3}),
])
def test_shares(name, expected):
    s = make(name)
    assert s.probabilities() == pytest.approx(expected)
    counts = Counter(s.next_task() for _ in range(20000))
    for task, p in expected.items():
        assert counts[task] / 20000 == pytest.approx(p, abs=0.015)


def test_temperature_interpolates_between_proportional_and_uniform():
    p1 = make("temperature", temperature=1.0).probabilities()
    p2 = make("temperature", temperature=2.0).probabilities()
    p100 = make("temperature", temperature=100.0).probabilities()
    assert p1 == pytest.approx(make("proportional").probabilities())
    # sqrt sizes: 94.87, 30, 10
    assert p2["big"] == pytest.approx(94.868 / 134.868, rel=1e-3)
    assert p1["small"] < p2["small"] < p100["small"] < 1 / 3 + 1e-9


def test_round_robin_cycles():
    s = make("round_robin")
    assert [s.next_task() for _ in range(7)] == ["big", "mid", "small"] * 2 + ["big"]


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_contract_deterministic_and_resumable(name):
    a, b = make(name), make(name)
    first = [a.next_task() for _ in range(50)]
    assert first == [b.next_task() for _ in range(50)]
    state = a.state_dict()
    cont = [a.next_task() for _ in range(50)]
    c = make(name)
    c.load_state_dict(state)
    assert [c.next_task() for _ in range(50)] == cont
    assert sum(a.probabilities().values()) == pytest.approx(1.0)
