"""Dropout with packed random draws: the same distribution as torch's dropout, gradients through the mask only,
repeatable under a seed, and a model whose modules were converted saves the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multitune.backbones.dropout import PackedMaskDropout, packed_keep_mask, use_packed_mask_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    torch.manual_seed(0)
    keep, scale = packed_keep_mask(torch.Size([1000, 1000]), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    assert abs(1.0 - keep.float().mean().item() - p) < 0.002
    assert scale == pytest.approx(1.0 / (1.0 - round(p * 65536) / 65536))
    # no lane of the packed 64-bit draws is biased (each int16 of a word decides one element)
    lanes = keep.reshape(-1, 4).float().mean(0)
    assert torch.all((lanes - (1 - p)).abs() < 0.004)


def test_output_and_gradient():
    torch.manual_seed(1)
    x = torch.randn(64, 50, 32, requires_grad=True)
    drop = PackedMaskDropout(0.1).train()
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * (65536 / (65536 - 6554)))
    assert abs(1.0 - kept.float().mean().item() - 0.1) < 0.01
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * (65536 / (65536 - 6554)))
    # the expectation is kept: the mean over many draws approaches the input
    torch.manual_seed(2)
    ones = torch.ones(200, 1000)
    assert drop(ones).mean().item() == pytest.approx(1.0, abs=0.005)


def test_bf16_keeps_dtype():
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    y = PackedMaskDropout(0.2).train()(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_eval_identity_and_seeded_repeat():
    x = torch.randn(10, 20)
    drop = PackedMaskDropout(0.3)
    assert torch.equal(drop.eval()(x), x)
    drop.train()
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    b = drop(x)
    assert torch.equal(a, b)
    assert torch.equal(PackedMaskDropout(0.0).train()(x), x)


def test_conversion_keeps_weights_and_leaves_other_dropouts():
    class Custom(nn.Dropout):
        pass

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.2), Custom(0.3)),
                          nn.Dropout(0.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_packed_mask_dropout(model) == 2
    assert type(model[1]) is PackedMaskDropout and model[1].p == 0.1
    assert type(model[2][0]) is PackedMaskDropout and model[2][0].p == 0.2
    assert type(model[2][1]) is Custom and type(model[3]) is nn.Dropout
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
