"""ldm/modules/ema.py: the original's shadow names, its warm-up decay, and swapping weights in and out."""

import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def small_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)  # frozen parameters have no shadow
    return model


def test_shadows_are_named_as_original_checkpoints_store_them():
    ema = LitEma(small_model())
    assert {name for name, _ in ema.named_buffers()} == {"decay", "num_updates", "0weight", "0bias", "1weight"}


def test_each_update_moves_the_shadow_by_the_warm_up_decay():
    model = small_model()
    ema = LitEma(model, decay=0.9999)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    decay = min(0.9999, (1 + 1) / (10 + 1))  # d = min(decay, (1 + n)/(10 + n)) after n = 1 update
    torch.testing.assert_close(ema.get_buffer("0weight"), start + (1 - decay) * 1.0)
    assert ema.num_updates.item() == 1


def test_copy_to_store_and_restore_swap_the_weights():
    model = small_model()
    ema = LitEma(model)
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in ema.buffers():
            if p.is_floating_point() and p.dim() > 0:
                p.fill_(0.5)
    ema.store(model.parameters())
    ema.copy_to(model)
    assert (model[0].weight == 0.5).all() and torch.equal(model[1].bias, trained[3])  # frozen: untouched
    ema.restore(model.parameters())
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match="decay"):
        LitEma(small_model(), decay=1.5)
