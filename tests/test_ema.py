import pytest
import torch
from torch import nn

from fer_core.ema import WARMUP_STEPS, warmed_up_decay, weight_average


def test_the_decay_warms_up_and_then_stays_at_the_configured_one():
    decays = [warmed_up_decay(0.99, n) for n in range(2000)]
    assert decays[0] == pytest.approx(1 / WARMUP_STEPS)
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert decays[-1] == 0.99 and max(decays) == 0.99


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_the_average_follows_the_warmed_up_formula_for_weights_and_batchnorm_statistics():
    model = small_net()
    average = weight_average(model, decay=0.9)
    expected = None
    for step in range(6):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        model.train()
        model(torch.randn(5, 1, 8, 8))  # moves BatchNorm's running statistics and its counter
        current = {k: v.clone() for k, v in model.state_dict().items()}
        if expected is None:  # the first update copies
            expected = current
        else:
            decay = warmed_up_decay(0.9, step)
            expected = {k: v if not v.is_floating_point() else decay * v + (1 - decay) * current[k]
                        for k, v in expected.items()}
        average.update_parameters(model)
        expected["1.num_batches_tracked"] = current["1.num_batches_tracked"]
    averaged = average.module.state_dict()
    assert int(average.n_averaged) == 6
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key], value, msg=key)
    assert not torch.allclose(averaged["3.weight"], model.state_dict()["3.weight"])
    assert not torch.allclose(averaged["1.running_mean"], model.state_dict()["1.running_mean"])


def test_the_average_is_a_copy_that_training_does_not_touch():
    model = small_net()
    average = weight_average(model, decay=0.99)
    average.update_parameters(model)
    before = {k: v.clone() for k, v in average.module.state_dict().items()}
    with torch.no_grad():
        model[3].weight.mul_(2)
    assert all(torch.equal(v, average.module.state_dict()[k]) for k, v in before.items())
