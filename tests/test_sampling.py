"""Task samplers: shares, random and balanced draws, determinism and exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.sampling import SAMPLERS

SIZES = {"big": 9000, "mid": 900, "small": 100}


def make(name: str, **extra):
    cls = SAMPLERS.get(name)
    return cls(SIZES, from_dict(cls.config_class, {"strategy": name, **extra}), seed=3)


@pytest.mark.parametrize("name, expected", [
    ("proportional", {"big": 0.9, "mid": 0.09, "small": 0.01}),
    ("uniform", {"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3}),
])
@pytest.mark.parametrize("draws", ["balanced", "random"])
def test_shares(name, expected, draws):
    s = make(name, draws=draws)
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


def test_balanced_draws_keep_every_count_within_one_batch_of_its_share():
    shares = {"big": 0.9, "mid": 0.09, "small": 0.01}
    balanced, random = make("proportional"), make("proportional", draws="random")
    assert balanced.config.draws == "balanced"  # the default
    counts: Counter = Counter()
    worst = 0.0
    for t in range(1, 2001):
        counts[balanced.next_task()] += 1
        worst = max(worst, *(abs(counts[n] - t * p) for n, p in shares.items()))
    assert worst <= 1.0
    assert counts == {"big": 1800, "mid": 180, "small": 20}
    # random draws of the same shares stray by several batches over the same run
    drawn = Counter(random.next_task() for _ in range(2000))
    assert max(abs(drawn[n] - 2000 * p) for n, p in shares.items()) > 3
    # the LLM benchmark's mixture: 960 / 960 / 356 examples, 80 batches; the small task gets its 12 or 13
    mixture = SAMPLERS.get("proportional")({"a": 960, "b": 960, "c": 356},
                                          from_dict(SAMPLERS.get("proportional").config_class,
                                                    {"strategy": "proportional", "draws": "balanced"}), seed=0)
    assert Counter(mixture.next_task() for _ in range(80))["c"] in (12, 13)
    # equal shares: a random order within each cycle, every task once per cycle
    uniform = make("uniform", draws="balanced")
    cycles = [[uniform.next_task() for _ in range(3)] for _ in range(20)]
    assert all(sorted(c) == ["big", "mid", "small"] for c in cycles) and len({tuple(c) for c in cycles}) > 1


def test_draws_must_be_random_or_balanced():
    with pytest.raises(ConfigError, match=r"sampling.draws|draws: got 'stratified'; expected one of: balanced, random"):
        make("proportional", draws="stratified")


@pytest.mark.parametrize("draws", ["random", "balanced"])
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_contract_deterministic_and_resumable(name, draws):
    extra = {} if name == "round_robin" else {"draws": draws}
    a, b = make(name, **extra), make(name, **extra)
    first = [a.next_task() for _ in range(50)]
    assert first == [b.next_task() for _ in range(50)]
    state = a.state_dict()
    cont = [a.next_task() for _ in range(50)]
    c = make(name, **extra)
    c.load_state_dict(state)
    assert [c.next_task() for _ in range(50)] == cont
    assert sum(a.probabilities().values()) == pytest.approx(1.0)
