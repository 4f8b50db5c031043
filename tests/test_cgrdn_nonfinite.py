"""CGRDNLightning skips a generator step whose loss or gradients are not finite (issue #16: a CPU run's
weights turned NaN in one step and every later step stayed NaN)."""

from __future__ import annotations

import torch

from models.lightning import CGRDNLightning

TINY = {
    "net": {"features": 4, "growth": 2, "rdb_layers": 1, "rdbs_per_grdb": 1, "grdbs": 1},
    "discriminator": {"channels": [4, 4, 4, 4]},
    "loss": {"w_adversarial": 0.0},
}


def _module() -> tuple[CGRDNLightning, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    module = CGRDNLightning(**TINY)
    optimizers = module.configure_optimizers()
    # the two Trainer hooks a manual-optimisation step calls, bound to plain autograd (no Trainer)
    module.optimizers = lambda use_pl_optimizer=True: optimizers  # type: ignore[method-assign]
    module.manual_backward = lambda loss, *a, **k: loss.backward(*a, **k)  # type: ignore[method-assign]
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    return module, optimizers


def test_a_non_finite_batch_leaves_weights_and_adam_state_unchanged():
    module, optimizers = _module()
    g = torch.Generator().manual_seed(1)
    clean = 0.01 + 0.005 * torch.rand(2, 1, 16, 16, generator=g)
    good = {"distorted": clean + 0.001 * torch.randn(clean.shape, generator=g), "clean": clean}
    module.training_step(good, 0)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    steps = optimizers[0].state[next(module.net.parameters())]["step"].clone()
    bad = {"distorted": good["distorted"].clone(), "clean": clean}
    bad["distorted"][0, 0, 3, 4] = float("nan")
    loss = module.training_step(bad, 1)
    assert not torch.isfinite(loss)
    after = module.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(optimizers[0].state[next(module.net.parameters())]["step"], steps)
    module.training_step(good, 2)  # a finite batch trains again
    assert not all(torch.equal(before[k], module.net.state_dict()[k]) for k in before)
