"""SyncSN and SyncSW on gloo: every rank's share equals SN/SW run on the concatenated batch
(the reference path; also SyncSN and SyncSW on the Triton kernels, against the reference)."""
import copy
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmsn import (SparseSwitchNorm2d, SwitchNorm2d, SwitchWhiten2d, SyncSparseSwitchNorm2d,
                  SyncSwitchNorm, SyncSwitchWhiten2d, convert_sync_sn, revert_sync_sn)
from mmsn.ops import set_backend
from processes import collective_timeout, spawn_ranks

CHANNELS = 16
#: limits of the spawned ranks: the layer comparison (up to 3 ranks; SW at 64 channels a
#: group in the interpreter on 2) and the double-backward check
SPAWN_SECONDS = 240
DOUBLE_SECONDS = 150


def make_layers(backend='torch', wide=False):
    """(name, local layer, synchronized layer) with the same random parameters; the kernel
    backends take the SW layers at 16 channels per group, and with ``wide`` at 64 too (the
    kernels' sizes; 64 is ~25 s per run under the interpreter, so one case, of 2 ranks, takes
    it: the 3 ranks with an empty one run the 16-per-group kernels)."""
    torch.manual_seed(0)
    layers = []
    for name, local, sync in [
        ('sn', SwitchNorm2d(CHANNELS), SyncSwitchNorm(CHANNELS)),
        ('ssn', SparseSwitchNorm2d(CHANNELS), SyncSparseSwitchNorm2d(CHANNELS)),
        ('sw2', SwitchWhiten2d(CHANNELS, num_pergroup=4, sw_type=2),
         SyncSwitchWhiten2d(CHANNELS, num_pergroup=4, sw_type=2)),
        ('sw5', SwitchWhiten2d(CHANNELS, num_pergroup=4, sw_type=5),
         SyncSwitchWhiten2d(CHANNELS, num_pergroup=4, sw_type=5)),
        # 16 channels per group: the size the SW kernels take
        ('sw5-16', SwitchWhiten2d(CHANNELS, num_pergroup=16, sw_type=5),
         SyncSwitchWhiten2d(CHANNELS, num_pergroup=16, sw_type=5)),
        # 64 per group: Newton's iteration through scratch memory in the kernels
        ('sw2-64', SwitchWhiten2d(64, num_pergroup=64, sw_type=2),
         SyncSwitchWhiten2d(64, num_pergroup=64, sw_type=2)),
    ]:
        local = local.double()
        with torch.no_grad():
            for param in local.parameters():
                param.uniform_(-1, 1) if param.dim() == 1 and param.numel() <= 5 else \
                    param.uniform_(0.5, 1.5)
        if name == 'ssn':
            local.radius.fill_(0.3)  # sparse, not one-hot ratios
        # float64 at 64 per group is the reference's (the kernels would spill): the kernels
        # run it in float32, against the float64 reference
        sync = sync.float() if name == 'sw2-64' and backend != 'torch' else sync.double()
        sync.load_state_dict(local.state_dict())
        layers.append((name, local, sync))
    if backend != 'torch':
        layers = [layer for layer in layers
                  if layer[0] in ('sn', 'ssn', 'sw5-16') or wide and layer[0] == 'sw2-64']
    return layers


def make_data(total, channels=CHANNELS):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(total, channels, 3, 4, generator=gen, dtype=torch.float64) * 2 + 1
    grad = torch.randn(total, channels, 3, 4, generator=gen, dtype=torch.float64)
    return x, grad


def run_rank(rank, world_size, port, sizes, out_dir, backend='torch', wide=False):
    # 'triton' runs the kernels (interpreted on CPU); 'composed' the registered ops the way
    # torch.compile traces them
    set_backend('triton' if backend == 'composed' else backend)
    os.environ.setdefault('TRITON_INTERPRET', '1')
    if backend == 'composed':
        import mmsn.ops
        mmsn.ops._compiling = lambda: True
    # A bounded timeout turns a missed collective into an error instead of a hang.
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size, timeout=collective_timeout(SPAWN_SECONDS))
    calls = {'all_gather': 0, 'all_reduce': 0}
    for op, counted_as in (('all_gather', 'all_gather'), ('all_gather_into_tensor', 'all_gather'),
                           ('all_reduce', 'all_reduce')):
        original = getattr(dist, op)

        def counted(*args, _op=counted_as, _original=original, **kwargs):
            calls[_op] += 1
            return _original(*args, **kwargs)
        setattr(dist, op, counted)
    start = sum(sizes[:rank])
    results = {}
    for name, _, layer in make_layers(backend, wide):
        dtype = next(layer.parameters()).dtype
        x_all, grad_all = (t.to(dtype) for t in make_data(sum(sizes), layer.num_features))
        for step in range(2):  # two steps: running statistics accumulate the same way
            x = x_all[start:start + sizes[rank]].clone().requires_grad_()
            layer.zero_grad()
            before = dict(calls)
            y = layer(x)
            after_forward = dict(calls)
            (y * grad_all[start:start + sizes[rank]]).sum().backward()
            results[name, step] = dict(
                y=y.detach(), x_grad=x.grad,
                param_grads={k: p.grad.clone() for k, p in layer.named_parameters()},
                buffers={k: b.clone() for k, b in layer.named_buffers()},
                forward_collectives={k: after_forward[k] - before[k] for k in calls},
                backward_collectives={k: calls[k] - after_forward[k] for k in calls})
        layer.eval()  # eval uses the running statistics: no collective at all
        before = dict(calls)
        results[name, 'eval'] = dict(y=layer(x_all[start:start + sizes[rank]]).detach(),
                                     collectives={k: calls[k] - before[k] for k in calls})
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize('sizes,backend', [
    ((1, 4), 'torch'), ((2, 0, 3), 'torch'), ((1, 4), 'triton-wide'), ((2, 0, 3), 'triton'),
    ((2, 0, 3), 'composed')], ids=lambda v: '3-ranks-one-empty' if v == (2, 0, 3) else
    '2-ranks' if v == (1, 4) else v)
@pytest.mark.timeout(SPAWN_SECONDS + 60)
def test_sync_layers_equal_local_layers_on_concatenated_batch(sizes, backend, tmp_path):
    """'triton-wide': the kernels with SW at 64 channels per group too (2 ranks: a third
    would cost another interpreted rank of it, the empty rank is the 16-per-group case's)."""
    backend, wide = backend.removesuffix('-wide'), backend.endswith('-wide')
    if backend != 'torch':
        pytest.importorskip('triton')
    world_size = len(sizes)
    spawn_ranks(run_rank, (world_size, free_port(), list(sizes), str(tmp_path), backend, wide),
                nprocs=world_size, timeout=SPAWN_SECONDS)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(world_size)]
    for name, local, sync in make_layers(backend, wide):
        x_all, grad_all = make_data(sum(sizes), local.num_features)
        # a float32 run against the float64 reference: float32's rounding through Newton's
        # iteration and its backward (1e-6 relative here), with a margin
        close = functools.partial(torch.testing.assert_close, check_dtype=False, **(
            dict(rtol=1e-4, atol=1e-4) if next(sync.parameters()).dtype == torch.float32
            else {}))
        if next(sync.parameters()).dtype == torch.float32:  # the ranks saw float32 inputs
            x_all, grad_all = x_all.float().double(), grad_all.float().double()
        for step in range(2):
            x = x_all.clone().requires_grad_()
            local.zero_grad()
            y = local(x)
            (y * grad_all).sum().backward()
            got = [rank[name, step] for rank in ranks]
            close(torch.cat([g['y'] for g in got]).double(), y.detach())
            close(torch.cat([g['x_grad'] for g in got]).double(), x.grad)
            for key, param in local.named_parameters():
                summed = sum(g['param_grads'][key] for g in got)
                close(summed.double(), param.grad, msg=f'{name} {key}')
            for g in got:
                for key, buffer in local.named_buffers():
                    close(g['buffers'][key].to(buffer.dtype), buffer, msg=f'{name} {key}')
                assert g['forward_collectives'] == {'all_gather': 1, 'all_reduce': 0}
                assert g['backward_collectives'] == {'all_gather': 0, 'all_reduce': 1}
        local.eval()
        eval_got = [rank[name, 'eval'] for rank in ranks]
        close(torch.cat([g['y'] for g in eval_got]).double(), local(x_all))
        assert all(g['collectives'] == {'all_gather': 0, 'all_reduce': 0} for g in eval_got)


def test_sync_layers_fall_back_without_process_group():
    for _, local, sync in make_layers():
        x, _ = make_data(3, local.num_features)
        torch.testing.assert_close(sync(x), local(x))
        torch.testing.assert_close(sync.running_mean, local.running_mean)


def test_convert_and_revert_keep_state_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8, last_gamma=True),
                          nn.Sequential(SwitchWhiten2d(8, num_pergroup=4, sw_type=5)))
    model(torch.randn(2, 3, 4, 4))
    model[1].weight.requires_grad_(False)
    model.eval()
    state = copy.deepcopy(model.state_dict())
    converted = convert_sync_sn(model)
    assert type(converted[1]) is SyncSwitchNorm and type(converted[2][0]) is SyncSwitchWhiten2d
    assert converted[2][0].sw_type == 5 and not converted[1].training
    assert not converted[1].weight.requires_grad
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key
    reverted = revert_sync_sn(converted)
    assert type(reverted[1]) is SwitchNorm2d and type(reverted[2][0]) is SwitchWhiten2d
    assert reverted[1].last_gamma
    for key, value in reverted.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert type(convert_sync_sn(SwitchNorm2d(4))) is SyncSwitchNorm


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_convert_keeps_parameter_objects_dtype_and_the_optimizer(dtype):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), SwitchNorm2d(8), SparseSwitchNorm2d(8),
                          SwitchWhiten2d(8, num_pergroup=4)).to(dtype)
    model[2].radius.fill_(0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the conversion
    before = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    converted = convert_sync_sn(model)
    assert [type(m) for m in converted[1:]] == [SyncSwitchNorm, SyncSparseSwitchNorm2d,
                                                SyncSwitchWhiten2d]
    for name, param in converted.named_parameters():
        assert param is before[name] and param.dtype == dtype, name
    for name, buf in converted.named_buffers():
        assert buf is buffers[name], name
    values = {name: p.detach().clone() for name, p in converted.named_parameters()}
    converted(torch.randn(4, 3, 5, 5, dtype=dtype)).square().mean().backward()
    optimizer.step()
    for layer in ('1', '2', '3'):  # the optimizer updated the converted layers
        changed = [name for name, p in converted.named_parameters()
                   if name.startswith(layer + '.') and not torch.equal(p, values[name])]
        assert changed, layer
    reverted = revert_sync_sn(converted)
    assert [type(m) for m in reverted[1:]] == [SwitchNorm2d, SparseSwitchNorm2d, SwitchWhiten2d]
    for name, param in reverted.named_parameters():
        assert param is before[name], name


def double_backward_rank(rank, world_size, port, out_dir, backend):
    set_backend(backend)
    os.environ.setdefault('TRITON_INTERPRET', '1')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size, timeout=collective_timeout(DOUBLE_SECONDS))
    outcome = {}
    for name, layer in (('sn', SyncSwitchNorm(CHANNELS)),
                        ('sw', SyncSwitchWhiten2d(CHANNELS, num_pergroup=16))):
        x = make_data(2 * world_size)[0][rank::world_size].float().requires_grad_()
        y = layer(x)
        try:
            dx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            dx.square().sum().backward()
            outcome[name] = 'no error'
        except RuntimeError as error:
            outcome[name] = str(error)
    torch.save(outcome, os.path.join(out_dir, f'double{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['torch', 'triton'])
@pytest.mark.timeout(DOUBLE_SECONDS + 30)
def test_double_backward_of_synchronized_layers_is_a_clear_error(backend, tmp_path):
    """Second derivatives through the collective would miss the other ranks' terms: refused
    with an error, never a silently wrong gradient."""
    if backend == 'triton':
        pytest.importorskip('triton')
    spawn_ranks(double_backward_rank, (2, free_port(), str(tmp_path), backend), nprocs=2,
                timeout=DOUBLE_SECONDS)
    for rank in range(2):
        outcome = torch.load(tmp_path / f'double{rank}.pt', weights_only=True)
        for name in ('sn', 'sw'):
            assert 'double backward (create_graph=True) through the synchronized' in \
                outcome[name], (rank, name, outcome[name])
