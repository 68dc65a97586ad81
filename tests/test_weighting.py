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


def test_uncertainty_reaches_its_balance_at_its_own_learning_rate():
    """Losses 20-fold apart (a squared error on a 0-1 scale next to a cross-entropy): with the optimizer groups a
    run builds, at the strategy's own rate, the weights reach their balance 1 / loss within 200 steps; at a
    head's 1e-3 they would hardly leave 1 (a plain sum)."""
    from multitune.optim import build_optimizer, build_param_groups

    def train(weighting, steps=200):
        lr = weighting.parameter_learning_rate()
        groups = build_param_groups(torch.nn.Linear(1, 1), [("loss_weighting", weighting,
                                                              *([lr] if lr else []))], 1e-5, 1e-3, 0.01)
        opt = build_optimizer(groups, 1e-5)
        for _ in range(steps):
            loss, _ = weighting({"a": torch.tensor(0.02), "b": torch.tensor(0.4)})
            opt.zero_grad()
            loss.backward()
            opt.step()
        return weighting.weights(), [g["lr"] for g in groups if g["name"].startswith("loss_weighting")]

    weights, lrs = train(make("uncertainty"))
    assert lrs == [0.05]
    assert weights["a"] == pytest.approx(1 / 0.02, rel=0.2) and weights["b"] == pytest.approx(1 / 0.4, rel=0.2)
    slow, lrs = train(make("uncertainty", learning_rate=1e-3))
    assert lrs == [1e-3] and max(slow.values()) < 1.5


@pytest.mark.parametrize("name", WEIGHTINGS.names())
def test_contract_combines_any_subset(name):
    w = make(name)
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    extra = {"shared_layer": layer} if w.needs_shared_layer else {}
    for tasks in (["a"], ["a", "b"]):
        losses = {t: (i + 1.0) * (layer ** 2).sum() for i, t in enumerate(tasks)}
        total, used = w(losses, **extra)
        assert total.ndim == 0 and math.isfinite(float(total)) and set(used) == set(losses)
        total.backward()
        assert layer.grad is not None and torch.isfinite(layer.grad).all()
        layer.grad = None
        values = {t: float(v) for t, v in losses.items()}
        w.step(values, {t: 0.9 * v for t, v in values.items()} if w.needs_losses_after_step else None)
        if w.needs_per_task_gradients:
            g = w.combine({t: torch.tensor([1.0, -1.0]) * (i + 1) for i, t in enumerate(tasks)})
            assert g.shape == (2,) and torch.isfinite(g).all()
    assert set(w.weights()) == set(NAMES)
    assert all(math.isfinite(v) for v in w.weights().values())

# -- dynamic weight average -------------------------------------------------------------------------------
def test_dwa_weights_from_the_ratio_of_the_last_two_periods():
    w = make("dwa", period=1, temperature=2.0)
    assert w.weights() == {"a": 1.0, "b": 1.0}  # no history yet: equal weights
    w.step({"a": 2.0, "b": 1.0})
    assert w.weights() == {"a": 1.0, "b": 1.0}  # one period: no ratio yet
    w.step({"a": 1.0, "b": 1.0})
    # r = (1/2, 1/1); w_k = 2 exp(r_k / 2) / (exp(0.25) + exp(0.5))
    expected_a = 2 * math.exp(0.25) / (math.exp(0.25) + math.exp(0.5))
    assert w.weights() == {"a": pytest.approx(expected_a), "b": pytest.approx(2 - expected_a)}
    total, used = w({"a": torch.tensor(3.0), "b": torch.tensor(1.0)})
    assert float(total) == pytest.approx(3 * expected_a + (2 - expected_a))
    assert w.stats["loss_ratio"] == {"a": 0.5, "b": 1.0}


def test_dwa_averages_each_task_over_a_period_even_with_one_task_per_step():
    w = make("dwa", period=2)
    for losses in ({"a": 4.0}, {"b": 1.0}, {"a": 2.0}, {"a": 1.0}):  # period means: a 4, b 1; then a 1.5, b -
        w.step(losses)
    assert float(w.history[0, 0]) == 4.0 and math.isnan(w.history[0, 1])
    assert w.history[1].tolist() == [1.5, 1.0]
    ratio_a = 1.5 / 4.0  # b has one period only: ratio 1
    expected_a = 2 * math.exp(ratio_a / 2) / (math.exp(ratio_a / 2) + math.exp(0.5))
    assert w.weights()["a"] == pytest.approx(expected_a)


# -- GradNorm ---------------------------------------------------------------------------------------------
def gradnorm_losses(layer: torch.nn.Parameter, value_a: float, value_b: float) -> dict[str, torch.Tensor]:
    """|grad_W L_a| = 3 and |grad_W L_b| = 1 at any W; the values are the given ones at W = 0."""
    return {"a": 3 * layer[0] + value_a, "b": layer[1] + value_b}


def test_gradnorm_weight_gradient_matches_the_paper():
    w = make("gradnorm", alpha=1.5)
    layer = torch.nn.Parameter(torch.zeros(2))
    total, used = w(gradnorm_losses(layer, 4.0, 2.0), shared_layer=layer)  # first losses: L(0) = (4, 2)
    assert float(total) == pytest.approx(6.0) and used == {"a": 1.0, "b": 1.0}
    total.backward()
    # r = (1, 1); G = (3, 1), target = mean(G) = 2: d L_grad / d w = (sign(3 - 2) 3, sign(1 - 2) 1)
    assert w.task_weights.grad.tolist() == pytest.approx([3.0, -1.0])
    assert layer.grad.tolist() == pytest.approx([3.0, 1.0])  # the network sees sum_i w_i L_i only
    assert w.stats["grad_norm"] == {"a": 3.0, "b": 1.0}

    w.task_weights.grad = None
    with torch.no_grad():
        w.task_weights.copy_(torch.tensor([0.2, 1.8]))
    total, _ = w(gradnorm_losses(layer, 2.0, 2.0), shared_layer=layer)
    total.backward()
    # L/L(0) = (0.5, 1) -> r = (2/3, 4/3); G = (0.6, 1.8), mean 1.2; targets 1.2 r^1.5 = (0.653, 1.848)
    rate = [0.5 / 0.75, 1.0 / 0.75]
    assert w.stats["training_rate"] == {"a": pytest.approx(rate[0], abs=1e-6), "b": pytest.approx(rate[1], abs=1e-6)}
    assert w.task_weights.grad.tolist() == pytest.approx([-3.0, -1.0])
    assert w.stats["gradnorm_loss"] == pytest.approx(abs(0.6 - 1.2 * rate[0] ** 1.5) + abs(1.8 - 1.2 * rate[1] ** 1.5),
                                                     abs=1e-5)


def test_gradnorm_renormalises_the_weights_to_the_number_of_tasks():
    w = make("gradnorm")
    with torch.no_grad():
        w.task_weights.copy_(torch.tensor([1.5, 0.3]))
    w.step({"a": 1.0, "b": 1.0})
    assert w.weights() == {"a": pytest.approx(2 * 1.5 / 1.8), "b": pytest.approx(2 * 0.3 / 1.8)}


# -- FAMO -------------------------------------------------------------------------------------------------
def test_famo_weights_and_logit_update_by_hand():
    w = make("famo", learning_rate=0.025, gamma=0.0)
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    total, used = w({"a": a, "b": b})
    # z = (1/2, 1/2), c = 0.5/2 + 0.5/1 = 3/4: loss = (0.5 ln 2 + 0.5 ln 1) / c; weights z_i / (c L_i)
    assert float(total) == pytest.approx(0.5 * math.log(2) / 0.75, rel=1e-6)
    assert used == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 3)}
    total.backward()
    assert float(a.grad) == pytest.approx(1 / 3) and float(b.grad) == pytest.approx(2 / 3)
    # a fell from 2 to 1, b from 1 to 0.9: a improved more and loses weight. The first Adam step moves each
    # logit by the learning rate against the sign of its gradient z_i (delta_i - z . delta).
    w.step({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.9})
    assert w.logits.tolist() == pytest.approx([-0.025, 0.025], rel=1e-5)
    z_a = math.exp(-0.025) / (math.exp(-0.025) + math.exp(0.025))
    assert w.weights() == {"a": pytest.approx(z_a, rel=1e-5), "b": pytest.approx(1 - z_a, rel=1e-5)}


# -- PCGrad -----------------------------------------------------------------------------------------------
def test_pcgrad_projects_two_conflicting_gradients():
    w = make("pcgrad")
    g = w.combine({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 1.0])})
    # a . b = -1 < 0: a - (-1 / 2) b = (0.5, 0.5); b - (-1 / 1) a = (0, 1); sum (0.5, 1.5)
    assert g.tolist() == pytest.approx([0.5, 1.5])
    assert w.stats["conflicts"] == 2
    assert w.stats["cosine"] == {"a|b": pytest.approx(-1 / math.sqrt(2))}


def test_pcgrad_leaves_agreeing_gradients_alone_and_projects_only_conflicting_pairs():
    w = WEIGHTINGS.get("pcgrad")(["a", "b", "c"], WEIGHTINGS.get("pcgrad").config_class())
    agree = w.combine({"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.0, 0.0]),
                       "c": torch.tensor([0.0, 0.0, 2.0])})
    assert agree.tolist() == [2.0, 1.0, 2.0] and w.stats["conflicts"] == 0
    g = w.combine({"a": torch.tensor([1.0, 0.0, 0.0]), "b": torch.tensor([-1.0, 1.0, 0.0]),
                   "c": torch.tensor([0.0, 0.0, 1.0])})  # c is orthogonal to both: whatever the order
    assert g.tolist() == pytest.approx([0.5, 1.5, 1.0]) and w.stats["conflicts"] == 2


def test_pcgrad_orders_repeat_after_a_state_round_trip():
    grads = {n: torch.randn(16, generator=torch.Generator().manual_seed(i)) for i, n in enumerate("abc")}
    w = WEIGHTINGS.get("pcgrad")(list("abc"), WEIGHTINGS.get("pcgrad").config_class())
    w.combine(grads)
    state = {k: v.clone() for k, v in w.state_dict().items()}
    expected = w.combine(grads)
    again = WEIGHTINGS.get("pcgrad")(list("abc"), WEIGHTINGS.get("pcgrad").config_class())
    again.load_state_dict(state)
    assert torch.equal(again.combine(grads), expected)


# -- CAGrad -----------------------------------------------------------------------------------------------
def test_cagrad_on_orthogonal_gradients():
    w = make("cagrad", c=0.4)
    g = w.combine({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])})
    # by symmetry w = (1/2, 1/2), g_w = g0 = (0.5, 0.5): d = (1 + c) g0 / (1 + c^2)
    assert g.tolist() == pytest.approx([1.4 * 0.5 / 1.16] * 2, rel=1e-4)
    assert w.stats["w"] == {"a": pytest.approx(0.5, abs=1e-3), "b": pytest.approx(0.5, abs=1e-3)}


def test_cagrad_with_c_zero_is_the_mean_gradient():
    g = make("cagrad", c=0.0).combine({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-0.5, 1.0])})
    assert g.tolist() == pytest.approx([0.25, 0.5], abs=1e-6)


def test_cagrad_solves_the_simplex_problem():
    """Conflicting gradients: the solver's w matches a brute-force search of the dual, and the update
    improves the worse task more than the mean gradient does."""
    ga, gb = torch.tensor([1.0, 0.0]), torch.tensor([-0.8, 0.3])
    c = 0.4
    g0 = (ga + gb) / 2
    radius = c * float(g0.norm())

    def dual(x: float) -> float:
        gw = x * ga + (1 - x) * gb
        return float(gw @ g0) + radius * float(gw.norm())

    best = min((i / 10000 for i in range(10001)), key=dual)
    w = make("cagrad", c=c)
    g = w.combine({"a": ga, "b": gb})
    assert w.stats["w"]["a"] == pytest.approx(best, abs=2e-3)
    gw = best * ga + (1 - best) * gb
    assert g.tolist() == pytest.approx(((g0 + radius / gw.norm() * gw) / (1 + c * c)).tolist(), abs=1e-3)
    assert min(float(g @ ga), float(g @ gb)) / float(g.norm()) > min(float(g0 @ ga), float(g0 @ gb)) / float(g0.norm())


# -- declared needs and config ----------------------------------------------------------------------------
def test_declared_needs():
    needs = {n: (WEIGHTINGS.get(n).needs_all_tasks, WEIGHTINGS.get(n).needs_per_task_gradients)
             for n in WEIGHTINGS.names()}
    assert needs["pcgrad"] == needs["cagrad"] == (True, True)
    assert needs["gradnorm"] == needs["famo"] == (True, False)
    assert needs["dwa"] == needs["sum"] == (False, False)
    assert WEIGHTINGS.get("gradnorm").needs_shared_layer and WEIGHTINGS.get("famo").needs_losses_after_step


@pytest.mark.parametrize(("name", "extra", "path"), [
    ("dwa", {"temperature": 0}, "loss_weighting.temperature"), ("dwa", {"period": 0}, "loss_weighting.period"),
    ("gradnorm", {"alpha": -1}, "loss_weighting.alpha"), ("cagrad", {"c": 1.5}, "loss_weighting.c"),
    ("famo", {"learning_rate": 0}, "loss_weighting.learning_rate"), ("pcgrad", {"c": 0.4}, "loss_weighting.c")])
def test_config_checks(name, extra, path):
    cls = WEIGHTINGS.get(name)
    with pytest.raises(ConfigError, match=path):
        from_dict(cls.config_class, {"strategy": name, **extra}, "loss_weighting")
