"""The AdaGC core (lightning_gradstab.per_tensor_clip): validation, the warm-up seeding, non-finite and absent
gradients, and a state round trip."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_gradstab.per_tensor_clip import AdaptiveTensorClip


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"beta": 1.0}, "beta"), ({"relative_threshold": 0}, "relative_threshold"),
     ({"absolute_threshold": math.inf}, "absolute_threshold"), ({"warmup_steps": 0}, "warmup_steps"),
     ({"warmup_steps": True}, "warmup_steps"), ({"eps": -1.0}, "eps")],
)
def test_bad_settings_are_refused_naming_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        AdaptiveTensorClip(**kwargs)


def test_warm_up_clips_globally_and_seeds_the_ema_with_the_minimum_clipped_norm():
    clip = AdaptiveTensorClip(warmup_steps=2)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 12.0])  # norms 5 and 12, total 13
    factors = clip.clip_([a, b])
    torch.testing.assert_close(factors, torch.full((2,), 1 / 13))
    torch.testing.assert_close(clip.ema_norms, torch.tensor([5 / 13, 12 / 13]))
    clip.clip_([torch.tensor([0.3, 0.4]), torch.tensor([0.0, 0.0, 0.1])])  # total < 1: untouched, ema = min
    torch.testing.assert_close(clip.ema_norms, torch.tensor([5 / 13, 0.1]))


def test_after_warm_up_one_tensor_is_cut_to_lambda_rel_times_its_ema_and_the_other_left_alone():
    clip = AdaptiveTensorClip(warmup_steps=1)
    clip.clip_([torch.tensor([0.3, 0.4]), torch.tensor([0.5])])  # total 0.71 < 1: ema [0.5, 0.5]
    a, b = torch.tensor([0.3, 0.4]), torch.tensor([50.0])
    factors = clip.clip_([a, b])
    torch.testing.assert_close(b, torch.tensor([1.05 * 0.5]))
    assert float(factors[0]) == 1.0
    torch.testing.assert_close(clip.ema_norms, torch.tensor([0.5, 0.98 * 0.5 + 0.02 * 1.05 * 0.5]))


def test_absent_and_non_finite_gradients_leave_their_ema_alone_and_are_not_scaled():
    clip = AdaptiveTensorClip(warmup_steps=1)
    clip.clip_([torch.tensor([1.0]), torch.tensor([2.0])])
    before = clip.ema_norms.clone()
    bad = torch.tensor([math.inf])
    factors = clip.clip_([None, bad])
    assert float(bad) == math.inf and factors.tolist() == [1.0, 1.0]
    torch.testing.assert_close(clip.ema_norms, before)


def test_a_changed_tensor_list_is_refused():
    clip = AdaptiveTensorClip()
    clip.clip_([torch.ones(2)])
    with pytest.raises(ValueError, match="same order"):
        clip.clip_([torch.ones(2), torch.ones(2)])


def test_state_round_trip_continues_identically_and_bad_state_is_refused():
    grads = [[torch.randn(5, generator=torch.Generator().manual_seed(t)) * (1 + t)] for t in range(6)]
    straight, first = AdaptiveTensorClip(warmup_steps=2), AdaptiveTensorClip(warmup_steps=2)
    for g in grads:
        straight.clip_([g[0].clone()])
    for g in grads[:3]:
        first.clip_([g[0].clone()])
    resumed = AdaptiveTensorClip(warmup_steps=2)
    resumed.load_state_dict(first.state_dict())
    for g in grads[3:]:
        resumed.clip_([g[0].clone()])
    torch.testing.assert_close(resumed.ema_norms, straight.ema_norms)
    assert resumed.step == 6
    with pytest.raises(ValueError, match="keys"):
        resumed.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="ema_norms"):
        resumed.load_state_dict({"step": 2, "ema_norms": torch.tensor([-1.0])})
