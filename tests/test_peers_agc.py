"""The ``agc`` peer is NFNet's adaptive gradient clipping (Brock et al. 2021): every unit's gradient is clipped to
``clip_factor * max(||W_i||, eps)``. Expected values below are worked out by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.peers import AGC_SETTINGS, AdaptiveGradientClipping, adaptive_clip_, resolve_method, unitwise_norm


def _param(weight, grad) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(weight, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_defaults_are_timms_adaptive_clip_grad_defaults():
    assert AGC_SETTINGS == {"clip_factor": 0.01, "eps": 1e-3}
    callback = resolve_method("agc")().callbacks[0]
    assert isinstance(callback, AdaptiveGradientClipping)
    assert (callback.clip_factor, callback.eps) == (0.01, 1e-3)


def test_unit_norms_are_per_output_row_of_a_matrix_and_whole_vector_for_a_bias():
    assert unitwise_norm(torch.tensor([[3.0, 4.0], [6.0, 8.0]])).flatten().tolist() == [5.0, 10.0]
    assert float(unitwise_norm(torch.tensor([3.0, 4.0]))) == 5.0


def test_a_linear_row_whose_gradient_is_too_large_for_its_weights_is_rescaled_to_the_limit():
    # row 0: ||W|| = 5, limit 0.05, ||G|| = 0.5 -> G * 0.1; row 1: ||W|| = 10, limit 0.1, ||G|| = 0.05 -> kept
    p = _param([[3.0, 4.0], [6.0, 8.0]], [[0.3, 0.4], [0.03, 0.04]])
    assert adaptive_clip_([p], clip_factor=0.01, eps=1e-3) == 1
    torch.testing.assert_close(p.grad, torch.tensor([[0.03, 0.04], [0.03, 0.04]], dtype=torch.float64))


def test_small_weights_are_floored_at_eps_so_their_gradients_are_not_clipped_to_nothing():
    # ||W_row|| = 5e-4 < eps = 1e-3: the limit is 0.01 * 1e-3 = 1e-5 (not 5e-6); ||G|| = 1e-4 -> scaled to 1e-5
    p = _param([[0.0, 5e-4]], [[0.0, 1e-4]])
    adaptive_clip_([p], clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(p.grad, torch.tensor([[0.0, 1e-5]], dtype=torch.float64))


def test_a_zero_bias_is_one_unit_clipped_to_clip_factor_times_eps():
    # ||b|| = 0 -> floored to 1e-3, limit 1e-5; ||G|| = 5 -> G * 2e-6 = [6e-6, 8e-6] (direction kept)
    p = _param([0.0, 0.0], [3.0, 4.0])
    adaptive_clip_([p], clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(p.grad, torch.tensor([6e-6, 8e-6], dtype=torch.float64))


def test_conv_kernels_are_clipped_per_output_channel():
    weight = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 10.0)])  # (out=2, in=1, 2, 2): norms 2, 20
    grad = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.05)])  # norms 1 (> 0.02), 0.1 (< 0.2)
    p = nn.Parameter(weight.double())
    p.grad = grad.double()
    adaptive_clip_([p], clip_factor=0.01, eps=1e-3)
    expected = torch.stack([torch.full((1, 2, 2), 0.01), torch.full((1, 2, 2), 0.05)]).double()
    torch.testing.assert_close(p.grad, expected)


def test_a_gradient_inside_the_limit_is_left_bit_identical():
    p = _param([[1.0, 1.0]], [[0.001, 0.002]])
    before = p.grad.clone()
    assert adaptive_clip_([p]) == 0
    assert torch.equal(p.grad, before)


def test_the_callback_clips_every_layer_but_the_final_linear_layer_of_each_optimizer():
    torch.manual_seed(0)
    body, head = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(body, nn.ReLU(), head)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)  # far above 0.01 x any of these weights' norms
    callback = AdaptiveGradientClipping()
    callback.on_before_optimizer_step(None, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.equal(head.weight.grad, torch.full_like(head.weight, 100.0))
    assert torch.equal(head.bias.grad, torch.full_like(head.bias, 100.0))
    limit = 0.01 * unitwise_norm(body.weight.detach()).clamp_min(1e-3)
    torch.testing.assert_close(unitwise_norm(body.weight.grad), limit)
    assert callback.summary() == {"counts": {"clip": 1}}


def test_with_two_optimizers_each_keeps_its_own_output_layer():
    generator, discriminator = (
        nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)),
        nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)),
    )
    owner = nn.ModuleDict({"g": generator, "d": discriminator})
    opt_g, opt_d = torch.optim.Adam(generator.parameters()), torch.optim.Adam(discriminator.parameters())
    assert AdaptiveGradientClipping.final_layer(owner, opt_g) is generator[1]
    assert AdaptiveGradientClipping.final_layer(owner, opt_d) is discriminator[1]


@pytest.mark.parametrize("bad", [{"clip_factor": 0.0}, {"eps": -1.0}])
def test_settings_must_be_positive(bad):
    with pytest.raises(ValueError):
        AdaptiveGradientClipping(**bad)


def test_agc_runs_as_a_benchmark_method():
    from benchmarks import divergence

    record = divergence.run_one("bad_init_scale", "agc", seed=0, steps=10)
    assert record["status"] == "finished" and record["steps_done"] == 10
    assert record["actions"]["counts"]["clip"] >= 1
