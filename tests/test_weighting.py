"""Loss weighting strategies: hand-computed values, learned parameters, logged weights."""

from __future__ import annotations

import math

import pytest
import torch

from multitune.config.parse import from_dict
from multitune.errors import ConfigError
from multitune.weighting import WEIGHTINGS

NAMES = ["a", "b"]


def make(name: str, **extra):
    cls = WEIGHTINGS.get(name)
    return cls(NAMES, from_dict(cls.config_class, {"strategy": name, **extra}))


def test_sum():
    total, used = make("sum")({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    assert float(total) == 5.0 and used == {"a": 1.0, "b": 1.0}


def test_static_weights_and_unknown_task():
    total, used = make("static", weights={"a": 0.5})({"a": torch.tensor(2.0), "b": torch.tensor(3.0)})
    assert float(total) == pytest.approx(4.0) and used == {"a": 0.5, "b": 1.0}
    with pytest.raises(ConfigError, match="loss_weighting.weights.c"):
        make("static", weights={"c": 1.0})


def test_uncertainty_matches_kendall_and_learns():
    w = make("uncertainty")
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([math.log(4.0), 0.0]))
    total, used = w({"a": torch.tensor(2.0)})
    # 0.5 * exp(-s) * L + 0.5 * s with s = log 4
    assert float(total) == pytest.approx(0.5 * 0.25 * 2.0 + 0.5 * math.log(4.0))
    assert used == {"a": pytest.approx(0.25)}
    # a task with a large loss gets its weight lowered by gradient descent
    w2 = make("uncertainty")
    opt = torch.optim.SGD(w2.parameters(), lr=0.1)
    for _ in range(50):
        loss, _ = w2({"a": torch.tensor(5.0), "b": torch.tensor(0.1)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = w2.weights()
    assert weights["a"] < 1.0 < weights["b"]


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_contract_combines_any_subset(name):
    w = make(name)
    for losses in ({"a": torch.tensor(1.0, requires_grad=True)},
                   {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)}):
        total, used = w(losses)
        assert total.ndim == 0 and set(used) == set(losses)
        total.backward()
        assert all(v.grad is not None for v in losses.values())
    assert set(w.weights()) == set(NAMES)
