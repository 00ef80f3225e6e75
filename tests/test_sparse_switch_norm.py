"""Sparse SN: sparsestmax, the SSN layer and its radius schedule."""
from types import SimpleNamespace

import pytest
import torch

from mmsn import SparseSwitchNorm2d
from mmsn.ops.sparsestmax import sparsemax, sparsestmax


def sparsestmax_by_search(planar, radius):
    """The closest point to ``planar`` (on the simplex's plane, inside the simplex) among the
    simplex points at least ``radius`` from its centre, by exhaustive search: ``planar``
    itself when far enough, else the closest point of the circle of that radius."""
    centre = torch.full((3,), 1 / 3, dtype=torch.float64)
    if (planar - centre).norm() >= radius:
        return planar
    e1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / 2 ** 0.5
    e2 = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64) / 6 ** 0.5
    angle = torch.linspace(0, 2 * torch.pi, 400001, dtype=torch.float64)[:, None]
    circle = centre + radius * (angle.cos() * e1 + angle.sin() * e2)
    circle = circle[(circle >= 0).all(1)]
    return circle[(circle - planar).norm(dim=1).argmin()]


def test_sparsestmax_properties():
    torch.manual_seed(0)
    for _ in range(20):
        z = torch.randn(3, dtype=torch.float64) * 0.3
        assert torch.allclose(sparsestmax(z, 0.0), sparsemax(z))
        one_hot = sparsestmax(z, 1.0)
        assert sorted(one_hot.tolist()) == [0.0, 0.0, 1.0] and one_hot.argmax() == z.argmax()
        planar = z - (z.sum() - 1) / 3  # z projected on the simplex's plane
        for radius in (0.2, 0.45, 0.6, 0.75):
            p = sparsestmax(z, radius)
            assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-9
            assert (p - 1 / 3).norm() >= radius - 1e-5
            if (planar > 0).all() and (p > 0).all():
                # the release's radial step is then the exact constrained projection
                torch.testing.assert_close(p, sparsestmax_by_search(planar, radius),
                                           atol=1e-4, rtol=0)


def test_uniform_logits_move_towards_a_vertex():
    # the release divides ~0 by 1e-6 here and returns ratios that do not sum to one
    for radius in (0.3, 0.6):
        ratios = sparsestmax(torch.ones(3), radius)
        assert abs(ratios.sum() - 1) < 1e-6 and (ratios >= 0).all()
        assert abs((ratios - 1 / 3).norm() - radius) < 1e-6 and ratios.argmax() == 0
    assert sparsestmax(torch.ones(3), 1.0).tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(sparsestmax(torch.ones(3), 0.0), torch.full((3,), 1 / 3))


def test_ssn_layer_ratios_gradients_and_fixing():
    torch.manual_seed(0)
    layer = SparseSwitchNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, 0.2, -0.1]))
        layer.var_weight.copy_(torch.tensor([0.1, 0.5, 0.2]))
    layer.radius.fill_(0.3)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.mean_weight.grad.abs().sum() > 0
    mean, var = layer.ratios()
    assert torch.allclose(mean.sum(), torch.tensor(1.0)) and (mean >= 0).all()
    layer.radius.fill_(1.0)
    assert layer.fix_one_hot() == (True, True)
    assert layer.mean_weight.tolist() == [1.0, 0.0, 0.0]  # stored as probabilities
    assert layer.var_weight.tolist() == [0.0, 1.0, 0.0]
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert layer.mean_weight.grad is None or not layer.mean_weight.grad.any()


def test_radius_hook_schedule_and_fixing():
    pytest.importorskip('mmengine')
    from mmengine.registry import HOOKS
    import mmsn  # noqa: F401
    hook = HOOKS.build(dict(type='SSNRadiusHook', max_radius=1.0, begin=10, end=110))
    assert [hook.radius_at(i, 1000) for i in (0, 10, 60, 110, 500)] == [0, 0, 0.5, 1.0, 1.0]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SparseSwitchNorm2d(4))
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([0.3, 0.2, -0.1]))
    runner = SimpleNamespace(model=model, iter=60, max_iters=200)
    hook.before_train_iter(runner, 0)
    assert float(model[1].radius) == 0.5 and not model[1].mean_fixed.item()
    runner.iter = 150
    hook.before_train_iter(runner, 0)
    assert model[1].mean_fixed.item() == 1 and model[1].mean_weight.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match='end'):
        HOOKS.build(dict(type='SSNRadiusHook', begin=5, end=5))


def test_ssn_in_an_mmdet_backbone():
    pytest.importorskip('mmdet')
    from mmengine.registry import MODELS, init_default_scope
    import mmsn  # noqa: F401
    init_default_scope('mmdet')
    model = MODELS.build(dict(type='ResNet', depth=18, base_channels=8,
                              norm_cfg=dict(type='SSN'), init_cfg=None))
    layers = [m for m in model.modules() if isinstance(m, SparseSwitchNorm2d)]
    assert len(layers) == 20 and 'layer1.0.sn1.radius' in model.state_dict()
    for layer in layers:
        layer.radius.fill_(0.5)
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_radius_hook_under_a_runner(short_demo_run):
    from mmengine.runner import Runner
    cfg = short_demo_run(max_iters=3, interval=100, num_train=4, num_val=2)
    cfg.model.backbone.norm_cfg = cfg.model.decode_head.norm_cfg = dict(type='SSN')
    cfg.custom_hooks = [dict(type='SSNRadiusHook', max_radius=1.0, end=2)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    layers = [m for m in runner.model.modules() if isinstance(m, SparseSwitchNorm2d)]
    assert len(layers) == 25
    # radius 0, 0.5, then 1 at the last iteration: every ratio one-hot and frozen
    assert all(float(m.radius) == 1.0 for m in layers)
    assert all(m.mean_fixed.item() == 1 and m.var_fixed.item() == 1 for m in layers)
    assert all(sorted(m.ratios()[0].tolist()) == [0.0, 0.0, 1.0] for m in layers)
