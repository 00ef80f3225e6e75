"""Edge cases of the kernel path (``MMSN_BACKEND=triton``) and of the reference, beyond the
shapes of tests/test_triton_kernels.py: inputs whose sizes Triton passes as constants
(batch 1, 1x1 maps, one group), empty inputs, maps too large for a CUDA grid axis, and GPUs
the kernels cannot serve.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), which compiles
nothing: what only a compile shows is checked by compiling the recorded launches for sm_80
with Triton's compiler in a subprocess (``mmsn.tools.compile_check``), and what only a huge
map shows by planning its launches without running them (``observe_launches``).

Tolerances against the reference (``compare`` of tests/test_triton_kernels.py) are that
module's, which says why they hold on a GPU too; the empty-input tests expect exact zeros
and unchanged buffers, as no arithmetic reaches them.
"""
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.distributed as dist

from mmsn import (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchWhiten2d, SyncSwitchNorm,
                  SyncSwitchWhiten2d)
from mmsn.ops import set_backend

pytest.importorskip('triton')

from processes import collective_timeout, spawn_ranks  # noqa: E402
from test_sync_layers import free_port  # noqa: E402
from test_triton_kernels import compare, random_layer, random_whitening  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------- sizes that Triton passes as constants

#: Records the launches of the layers built by ``LAYERS`` (a synchronized layer on a faked
#: 2-rank group: its two mixing stages, nothing gathered) at the given shapes and compiles
#: each for sm_80, printing the problems ``mmsn.tools.compile_check`` finds as JSON.
_COMPILE_SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
import mmsn
from mmsn.layers import base
from mmsn.ops import triton_switch_norm, triton_switch_whiten
from mmsn.tools import compile_check as aot
LAYERS = {
    'sn': lambda c: mmsn.SwitchNorm2d(c), 'syncsn': lambda c: mmsn.SyncSwitchNorm(c),
    'sw': lambda c: mmsn.SwitchWhiten2d(c, num_pergroup=16, sw_type=5),
    'syncsw': lambda c: mmsn.SyncSwitchWhiten2d(c, num_pergroup=16, sw_type=3),
}
kind, shapes = sys.argv[1], [tuple(map(int, s.split('x'))) for s in sys.argv[2:]]
aot._layer = lambda _, channels: LAYERS[kind](channels)
if kind.startswith('sync'):
    base.default_group = lambda: 'a faked group'
    for module in (triton_switch_norm, triton_switch_whiten):
        module.sync_world_size = lambda group=None: 2
    dist.all_gather_into_tensor = lambda *args, **kwargs: None
    dist.all_reduce = lambda *args, **kwargs: None
launches = aot.record_launches([kind], [1], [torch.float32], ['nchw'], shapes)
rows = aot.check(launches, [80], workers=1)
print(json.dumps(dict(kernels=sorted({row['kernel'] for row in rows}),
                      problems=aot.problems(rows))))
'''


def compile_problems(kind, *shapes):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, '-c', _COMPILE_SCRIPT, kind, *shapes], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize('kind,shapes', [
    ('sn', ['256x1x1']),            # DeepLabV3's image pool at batch 1; SwitchNorm1d on (1, C)
    ('syncsn', ['256x1x1']),        # the synchronized stages around the all-gather
    ('sw', ['16x1x1']),             # one sample, one group, one position
    ('syncsw', ['16x1x1'])])
def test_batch_1_on_1x1_maps_compiles(kind, shapes):
    """Triton's launcher passes integer arguments equal to 1 (N, L, groups, splits, ...) as
    compile-time constants, on which ``.to()`` does not exist: the interpreter runs such
    code, the compiler refused it. Every launch of batch 1 on a 1x1 map must compile, within
    its budget."""
    found = compile_problems(kind, *shapes)
    assert found['kernels'] and found['problems'] == []


@pytest.mark.parametrize('cls,shape', [(SwitchNorm2d, (1, 6, 1, 1)), (SwitchNorm1d, (1, 6)),
                                       (SwitchNorm1d, (1, 6, 1)), (SwitchNorm2d, (1, 1, 1, 1)),
                                       (SyncSwitchNorm, (1, 6, 1, 1))])
def test_sn_batch_1_on_1x1_maps_matches_reference(cls, shape, monkeypatch):
    layer = random_layer(cls, shape[1])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(11)) + 0.5
    compare(layer, x, torch.float32, monkeypatch, train=True)
    compare(layer, x, torch.float32, monkeypatch, train=False)


# ---------------------------------------------------------------------- empty inputs

def _empty_layers(backend):
    """(name, layer) pairs; the kernels take SW at 16 channels per group."""
    layers = [('sn2d', random_layer(SwitchNorm2d, 4)), ('sn3d', random_layer(SwitchNorm3d, 4)),
              ('sn1d', random_layer(SwitchNorm1d, 4)),
              ('sn-cumulative', random_layer(SwitchNorm2d, 4)),
              ('syncsn', random_layer(SyncSwitchNorm, 4)),
              ('sw', random_whitening(32, sw_type=5)),
              ('sw-cumulative', random_whitening(32, sw_type=2, momentum=None)),
              ('syncsw', random_whitening(32, cls=SyncSwitchWhiten2d, sw_type=3))]
    layers[3][1].momentum = None
    if backend == 'torch':
        layers.append(('sw-4-per-group', random_whitening(8, num_pergroup=4, sw_type=5)))
    return layers


def _empty_shape(name, case):
    dims = {'sn3d': 3, 'sn1d': 1}.get(name.split('-')[0], 2)
    channels = 4 if name.startswith(('sn', 'syncsn')) else 32 if 'per-group' not in name else 8
    spatial = {1: (5,), 2: (3, 4), 3: (2, 3, 4)}[dims]
    if case == 'empty-map':
        spatial = (0,) + spatial[1:]
        return (2, channels) + spatial
    return (0, channels) + spatial


@pytest.mark.parametrize('case', ['empty-map', 'empty-batch'])
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_empty_inputs_give_empty_outputs_zero_gradients_and_keep_buffers(backend, case,
                                                                        monkeypatch):
    """An empty map (``(2, C, 0, W)``) or an empty batch: empty output, zero (finite)
    gradients for every parameter, and running statistics (and the batch counter) untouched,
    in training and in eval, on the reference and on the kernels."""
    set_backend(backend)
    for name, layer in _empty_layers(backend):
        for training in (True, False):
            layer.train(training)
            layer.zero_grad(set_to_none=True)
            before = {k: v.clone() for k, v in layer.named_buffers()}
            x = torch.zeros(_empty_shape(name, case), requires_grad=True)
            y = layer(x)
            assert y.shape == x.shape, name
            (y * 2).sum().backward()
            assert x.grad.shape == x.shape, name
            for key, param in layer.named_parameters():
                if param.grad is not None:
                    assert torch.equal(param.grad, torch.zeros_like(param)), (name, key)
            for key, buffer in layer.named_buffers():
                assert torch.equal(buffer, before[key]), (name, training, key)


def _empty_rank(rank, world_size, port, out_dir, backend, scenario):
    """One rank: train steps of SyncSN and SyncSW on its part, results saved."""
    set_backend(backend)
    os.environ.setdefault('TRITON_INTERPRET', '1')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size, timeout=collective_timeout(EMPTY_SECONDS))
    results = {}
    for name, layer, x in _sync_cases(rank, scenario):
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * _grad_like(y)).sum().backward()
        results[name] = dict(y=y.detach(), x_grad=x.grad,
                             grads={k: p.grad.clone() for k, p in layer.named_parameters()},
                             buffers={k: b.clone() for k, b in layer.named_buffers()})
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def _sync_layers():
    torch.manual_seed(0)
    sn = SyncSwitchNorm(4, momentum=None).double()
    sw = SyncSwitchWhiten2d(16, num_pergroup=16, sw_type=5).double()
    for layer in (sn, sw):
        with torch.no_grad():
            for param in layer.parameters():
                param.uniform_(0.5, 1.5)
    return [('syncsn', sn), ('syncsw', sw)]


def _sync_cases(rank, scenario):
    """(name, layer, this rank's input): rank 0 has an empty map; rank 1 has elements in
    'one-empty', an empty map too in 'all-empty'."""
    cases = []
    for name, layer in _sync_layers():
        shape = (2, layer.num_features, 0 if rank == 0 or scenario == 'all-empty' else 3, 4)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        cases.append((name, layer, x * 2 + 1))
    return cases


def _grad_like(y):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(6), dtype=y.dtype)


#: the limit of the 2-rank empty-map runs (the test's is 30 s more)
EMPTY_SECONDS = 200


@pytest.mark.slow
@pytest.mark.timeout(EMPTY_SECONDS + 30)
@pytest.mark.parametrize('scenario', ['one-empty', 'all-empty'])
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_synchronized_layers_with_empty_maps(backend, scenario, tmp_path):
    """2 gloo ranks, rank 0 with an empty map. The global count decides: with rank 1's
    elements the running statistics take rank 1's batch (as SN/SW on rank 1's part alone
    would) and its outputs and gradients are that layer's; with none anywhere nothing
    changes. Rank 0's output is empty and its gradients zero."""
    spawn_ranks(_empty_rank, (2, free_port(), str(tmp_path), backend, scenario), nprocs=2,
                timeout=EMPTY_SECONDS)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for (name, sync, _), (_, _, x) in zip(_sync_cases(0, scenario), _sync_cases(1, scenario)):
        empty = ranks[0][name]
        assert empty['y'].numel() == 0 and empty['x_grad'].numel() == 0
        for key, grad in empty['grads'].items():
            assert torch.equal(grad, torch.zeros_like(grad)), (name, key)
        # the same layer, unsynchronized, on rank 1's part (the reference)
        local = (SwitchNorm2d(4, momentum=None) if name == 'syncsn' else
                 SwitchWhiten2d(16, num_pergroup=16, sw_type=5)).double()
        local.load_state_dict(sync.state_dict())
        before = {k: v.clone() for k, v in local.named_buffers()}
        x = x.clone().requires_grad_()
        y = local(x)
        (y * _grad_like(y)).sum().backward()
        got = ranks[1][name]
        torch.testing.assert_close(got['y'], y.detach())
        torch.testing.assert_close(got['x_grad'], x.grad)
        for key, param in local.named_parameters():
            torch.testing.assert_close(got['grads'][key], param.grad, msg=f'{name} {key}')
        for rank in ranks:
            for key, buffer in local.named_buffers():
                torch.testing.assert_close(rank[name]['buffers'][key], buffer,
                                           msg=f'{name} {key}')
                if scenario == 'all-empty':
                    assert torch.equal(rank[name]['buffers'][key], before[key]), (name, key)
                elif key != 'num_batches_tracked':
                    assert not torch.equal(rank[name]['buffers'][key], before[key]), (name, key)


# ------------------------------------------------------------------------ grid limits

def _planned_grids(layer, shape, dtype=torch.float32, memory_format=torch.contiguous_format,
                   multiprocessors=132):
    """(kernel name, grid) of every launch of a training step and an eval forward of
    ``layer`` on ``shape``, planned and not run (uninitialised inputs: no page of them is
    touched)."""
    from mmsn.tools.compile_check import step_and_eval
    from mmsn.ops.launching import observe_launches
    grids = []

    def observe(kernel, grid, arguments):
        grids.append((kernel.__name__, tuple(grid)))
        return False

    with observe_launches(observe, multiprocessors=multiprocessors):
        step_and_eval(layer, torch.empty(shape, dtype=dtype).to(memory_format=memory_format))
    return grids


@pytest.mark.parametrize('case', ['sn-cityscapes-nchw', 'sn-cityscapes-channels_last',
                                  'sn3d-channels_last_3d', 'sn3d-ncdhw', 'sw64-1024x1056',
                                  'sw64-1024x1056-channels_last', 'sw16-cityscapes'])
def test_large_maps_plan_grids_within_cuda_limits(case, monkeypatch):
    """CUDA takes at most 2**31 - 1 programs on grid axis 0 and 65535 on axes 1 and 2. Maps
    of whole-image segmentation (a 1024 x 2048 map), 3D volumes (128^3) and SW at 64
    channels per group on 1024 x 1056 used to plan 65536-67584 programs on axis 1."""
    set_backend('triton')
    layer, shape, layout = {
        'sn-cityscapes-nchw': (SwitchNorm2d(256), (1, 256, 1024, 2048), 'nchw'),
        'sn-cityscapes-channels_last': (SwitchNorm2d(256), (1, 256, 1024, 2048),
                                        'channels_last'),
        'sn3d-channels_last_3d': (SwitchNorm3d(64), (1, 64, 128, 128, 128), 'channels_last'),
        'sn3d-ncdhw': (SwitchNorm3d(64), (1, 64, 128, 128, 128), 'nchw'),
        'sw64-1024x1056': (SwitchWhiten2d(64, num_pergroup=64), (1, 64, 1024, 1056), 'nchw'),
        'sw64-1024x1056-channels_last': (SwitchWhiten2d(64, num_pergroup=64),
                                         (1, 64, 1024, 1056), 'channels_last'),
        'sw16-cityscapes': (SwitchWhiten2d(256, num_pergroup=16), (1, 256, 1024, 2048),
                            'nchw'),
    }[case]
    memory_format = torch.contiguous_format
    if layout == 'channels_last':
        memory_format = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    # bfloat16 (AMP's activations) halves the address space the plan reserves
    grids = _planned_grids(layer, shape, torch.bfloat16, memory_format)
    assert len({name for name, _ in grids}) >= 6, grids
    for name, grid in grids:  # one axis, within what CUDA and Triton's launcher take
        assert len(grid) == 1 and 1 <= grid[0] <= 2 ** 31 - 1, (name, grid)


def test_flat_grid():
    from mmsn.ops.launching import MAX_PROGRAMS, flat_grid
    assert flat_grid(7, 3) == (21,)
    assert flat_grid(MAX_PROGRAMS, 1) == (MAX_PROGRAMS,)
    # Triton's launcher multiplies the grid in a C int and skips a launch past it: refused
    with pytest.raises(ValueError, match='input: 4294967294 programs, over the 2147483647'):
        flat_grid(MAX_PROGRAMS, 2)


@pytest.mark.parametrize('case', ['sn-nchw', 'sn-channels_last', 'sw16', 'sw16-channels_last'])
def test_64_bit_positions_match_reference(case, monkeypatch):
    """The streaming passes with 64-bit positions (maps of 2**30 positions and more: their
    threshold lowered here to 16), under the interpreter, against the reference, a
    training step over several blocks of L and several splits."""
    import mmsn.ops.launching as launching
    monkeypatch.setattr(launching, 'LARGE_MAP', 16)
    wide = set()

    def record(kernel, grid, arguments):
        if str(arguments.get('POSITIONS')) == 'int64':
            wide.add(kernel.__name__)
        return True  # (and run it)
    if case.startswith('sn'):
        layer, shape = random_layer(SwitchNorm2d, 7), (1, 7, 50, 90)
        if case.endswith('channels_last'):
            layer, shape = random_layer(SwitchNorm2d, 3), (7, 3, 40, 20)
        streaming = {'_moments_kernel', '_affine_kernel', '_grad_sums_kernel',
                     '_grad_input_kernel'}
    else:
        layer, shape = random_whitening(112, sw_type=5), (1, 112, 15, 20)
        streaming = {'_group_moments_kernel', '_whiten_kernel', '_whiten_grad_sums_kernel',
                     '_whiten_grad_input_kernel'}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(12)) * 2 + 1
    if case.endswith('channels_last'):
        x = x.to(memory_format=torch.channels_last)
    with launching.observe_launches(record):
        compare(layer, x, torch.float32, monkeypatch, train=True)
    assert wide == streaming


# ------------------------------------------------- GPUs that the kernels cannot serve

@pytest.mark.parametrize('missing,message', [
    ('triton', 'Triton is not installed'),
    ('custom_op', 'torch.library.custom_op'),
    ('capability', 'compute capability 7.0')])
def test_gpus_the_kernels_cannot_serve_warn_once(missing, message, monkeypatch):
    """A CUDA tensor the kernels cannot serve (no Triton, a torch without custom ops, an old
    GPU) takes the reference with one warning per device naming what is missing."""
    import mmsn.ops as ops
    from mmsn.ops import backend_for
    set_backend(None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability',
                        lambda device=None: (7, 0) if missing == 'capability' else (9, 0))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Faked GPU')
    if missing == 'triton':
        monkeypatch.setattr(ops, 'TRITON_AVAILABLE', False)
    if missing == 'custom_op':
        monkeypatch.setattr(ops, 'CUSTOM_OPS_AVAILABLE', False)
    ops.gpu_supported.cache_clear()
    fakes = [types.SimpleNamespace(is_cuda=True, device=torch.device('cuda', i)) for i in (0, 1)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            for fake in fakes + fakes:
                assert backend_for(fake) == 'torch'
        messages = [str(w.message) for w in caught if str(w.message).startswith('mmsn:')]
        assert len(messages) == 2, messages  # once per device
        assert all(message in m and 'Faked GPU' in m for m in messages), messages
    finally:
        ops.gpu_supported.cache_clear()
