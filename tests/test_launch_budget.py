"""What one layer dispatches on the kernel path (its CPU-countable budget), counted
by :class:`mmsn.ops.counting.DeviceWork` (Triton launches planned, not run; views, metadata
and allocations not counted); parameter ``.grad`` starts as None."""
import os
from collections import Counter

import pytest
import torch

from mmsn import SwitchNorm2d, SwitchWhiten2d, SyncSwitchNorm, SyncSwitchWhiten2d
from mmsn.ops import KERNELS_AVAILABLE, set_backend
from mmsn.ops.counting import DeviceWork
from processes import spawn_ranks

pytestmark = pytest.mark.skipif(not KERNELS_AVAILABLE, reason='needs triton')

SHAPE = (4, 32, 6, 6)  # no reduction is split at this size


def step(layer, training=True, channels=SHAPE[1]):
    """(forward count, backward count, host syncs) of one step of ``layer``."""
    layer.train(training)
    shape = (SHAPE[0], channels) + SHAPE[2:]
    x = torch.randn(shape, requires_grad=training)
    dy = torch.randn(shape)
    with DeviceWork() as forward:
        y = layer(x)
    backward = None
    if training:
        with DeviceWork() as backward:
            y.backward(dy)
    syncs = forward.host_syncs + (backward.host_syncs if backward else Counter())
    return forward, backward, syncs


@pytest.fixture(autouse=True)
def kernel_backend(monkeypatch):
    set_backend('triton')
    monkeypatch.setenv('TRITON_INTERPRET', os.environ.get('TRITON_INTERPRET', '1'))


def test_sn_training_step_within_budget():
    forward, backward, syncs = step(SwitchNorm2d(SHAPE[1]))
    assert forward.total <= 4, forward
    assert backward.total <= 4, backward
    assert not syncs, syncs


def test_sn_eval_forward_within_budget():
    forward, _, syncs = step(SwitchNorm2d(SHAPE[1]), training=False)
    assert forward.total <= 3, forward
    assert not syncs, syncs


@pytest.mark.parametrize('group', [16, 32, 64])
@pytest.mark.parametrize('sw_type', [2, 5])
def test_sw_training_step_within_budget(sw_type, group):
    channels = max(SHAPE[1], group)
    forward, backward, syncs = step(SwitchWhiten2d(channels, num_pergroup=group,
                                                   sw_type=sw_type), channels=channels)
    assert forward.total <= 8, forward
    assert backward.total <= 8, backward
    assert not syncs, syncs


@pytest.mark.parametrize('group', [16, 64])
def test_sw_eval_forward(group):
    channels = max(SHAPE[1], group)
    forward, _, syncs = step(SwitchWhiten2d(channels, num_pergroup=group, sw_type=5),
                             training=False, channels=channels)
    assert forward.total <= 3, forward
    assert not syncs, syncs


def count_sync_step(rank, world_size, init_file, out_dir, layer_class):
    import torch.distributed as dist
    set_backend('triton')
    os.environ.setdefault('TRITON_INTERPRET', '1')
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size)
    torch.manual_seed(rank)
    forward, backward, syncs = step(layer_class(SHAPE[1]))
    torch.save(dict(forward=forward.total, backward=backward.total, syncs=dict(syncs),
                    detail=[repr(forward), repr(backward)]), os.path.join(out_dir, f'{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize('layer_class, budget', [(SyncSwitchNorm, 6),
                                                  (SyncSwitchWhiten2d, 8)],
                         ids=['SyncSN', 'SyncSW'])
@pytest.mark.timeout(180)
def test_synchronized_layers_within_budget(layer_class, budget, tmp_path):
    spawn_ranks(count_sync_step, (2, str(tmp_path / 'init'), str(tmp_path), layer_class),
                nprocs=2, timeout=150)
    for rank in range(2):
        counts = torch.load(tmp_path / f'{rank}.pt', weights_only=True)
        assert counts['forward'] <= budget, counts['detail'][0]
        assert counts['backward'] <= budget, counts['detail'][1]
        assert not counts['syncs'], counts['syncs']
