"""Replay the recorded norm-layer calls on a GPU: mmsn's Triton kernels against its
PyTorch reference, forward and backward.

    python benchmarks/replay_norm_calls.py [--calls tests/data/norm_calls.json]
        [--jobs N] [--limit N] [--csv PATH] [--smoke]

Every call of the file (``mmsn/norm_calls.py``: the shipped configs' calls, upstream
configs under ``--norm``, the edge-value sweep, the largest maps) runs in each of its
dtypes twice with the same random parameters, buffers, input and output gradient: on the
reference (``MMSN_BACKEND=torch``) and on the kernels (``MMSN_BACKEND=triton``), forward
and, where the call had one, backward. Compared: the output, the input gradient, every
parameter gradient and every buffer after the call (running statistics, counter).

Tolerances (the kernel tests', ``tests/test_triton_kernels.py``): ``|got - want| <= tol *
(max(|want|.max(), 1) + |want|)`` with tol 1e-10 for float64, 1e-4 for float32, 2e-3 for
float16 and 1.6e-2 for bfloat16 (both paths compute in float32 and round once); parameter
gradients and buffers at float32's at least. The table shows each error in units of its
tolerance (``<= 1`` passes) and the script exits 1 on any failure.

Skipped, and counted: synchronized calls with ``world > 1`` (one GPU: the compile check
plans them in a real process group, ``tests/test_sync_layers.py`` runs them), and calls
the kernels do not take (``sw_kernels_refuse``: float64 SW at 64 channels per group in the
recorded file; the reference on a GPU too).

``--jobs N`` replays in N processes (a fresh GPU machine compiles every kernel variant once:
in parallel, its CPU cores shorten that). ``--smoke`` replays a few small calls on the CPU
too (with ``TRITON_INTERPRET=1``): a check that the script runs. Needs torch and triton only.
"""
import argparse
import copy
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from common import add_smoke_option, mmsn_backend, positive_int, report  # noqa: E402

DEFAULT_CALLS = osp.join(ROOT, 'tests', 'data', 'norm_calls.json')
TOLERANCES = {'float64': 1e-10, 'float32': 1e-4, 'float16': 2e-3, 'bfloat16': 1.6e-2}
#: the smoke run: at most this many elements per input
SMOKE_NUMEL = 4096


def randomize(layer, seed: int) -> None:
    """Parameters and buffers away from their initial values (so that every term of the
    mixing and of its gradient shows): ratio logits N(0, 1), scale U(0.5, 1.5), shift
    N(0, 0.5), running statistics of a plausible size, a batch counter of 3."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith(('mean_weight', 'var_weight')):
                param.copy_(torch.randn(param.shape, generator=gen))
            elif name == 'weight':
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            elif name == 'bias':
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        for name, buffer in layer.named_buffers():
            if name == 'running_mean':
                buffer.copy_(torch.randn(buffer.shape, generator=gen))
            elif name == 'running_var':
                buffer.copy_(torch.rand(buffer.shape, generator=gen) * 1.5 + 0.5)
            elif name == 'running_cov':
                a = torch.randn(buffer.shape, generator=gen, dtype=torch.float64) * 0.3
                eye = torch.eye(buffer.shape[-1], dtype=torch.float64)
                buffer.copy_(a @ a.transpose(-1, -2) + eye)
            elif name == 'num_batches_tracked':
                buffer.fill_(3)


def run_call(call: dict, dtype: str, layer, backend: str, device, seed: int) -> dict:
    """One call on ``backend``: the tensors to compare."""
    from mmsn.norm_calls import make_input, needs_backward
    layer = copy.deepcopy(layer)
    x = make_input(call, dtype, device, generator=torch.Generator(device).manual_seed(seed))
    with mmsn_backend(backend), torch.set_grad_enabled(needs_backward(call)):
        y = layer(x)
        if y.requires_grad:
            dy = torch.randn(y.shape, generator=torch.Generator(device).manual_seed(seed + 1),
                             device=device).to(y.dtype)
            y.backward(dy)
    out = dict(y=y.detach())
    if call['input_grad']:
        out['dx'] = x.grad
    for name, param in layer.named_parameters():
        if call['param_grad']:
            out[f'd{name}'] = param.grad
    for name, buffer in layer.named_buffers():
        out[name] = buffer
    return out


def error_ratio(got, want, tol: float) -> float:
    """The largest ``|got - want| / (tol * (scale + |want|))`` (``<= 1`` passes)."""
    if got is None or want is None:
        return 0.0 if got is want else float('inf')
    if got.shape != want.shape:
        return float('inf')
    if not want.is_floating_point():
        return 0.0 if torch.equal(got, want) else float('inf')
    if want.numel() == 0:
        return 0.0
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1.0)
    ratio = ((got - want).abs() / (tol * (scale + want.abs()))).max().item()
    return ratio if ratio == ratio else float('inf')  # NaN fails


def replay(call: dict, dtype: str, device, seed: int) -> dict:
    """The kernels against the reference on one call: one table row."""
    from mmsn.norm_calls import build_layer
    layer = build_layer(call, dtype, device)
    randomize(layer, seed)
    start = time.perf_counter()
    want = run_call(call, dtype, layer, 'torch', device, seed)
    got = run_call(call, dtype, layer, 'triton', device, seed)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    wide = 'float32' if dtype in ('float16', 'bfloat16') else dtype
    errors = {}
    for key, value in want.items():
        tol = TOLERANCES[dtype if key in ('y', 'dx') else wide]
        errors[key] = error_ratio(got.get(key), value, tol)
    if got['y'].stride() != want['y'].stride() or got['y'].dtype != want['y'].dtype:
        errors['y'] = float('inf')  # memory format and dtype kept
    worst = max(errors, key=errors.get)
    return dict(y=errors['y'], dx=errors.get('dx', 0.0),
                params=max([v for k, v in errors.items() if k.startswith('d') and k != 'dx'],
                           default=0.0),
                buffers=max([v for k, v in errors.items() if not k.startswith(('d', 'y'))],
                            default=0.0),
                worst=worst, ok=errors[worst] <= 1.0, seconds=time.perf_counter() - start)


def describe(call: dict) -> dict:
    options = call['options']
    layer = call['layer'] + (f"-{options['num_pergroup']}/{options['sw_type']}"
                             if 'num_pergroup' in options else '')
    layout = 'channels_last' if len(call['shape']) > 2 and call['stride'][1] == 1 and \
        call['shape'][1] > 1 and any(s > 1 for s in call['shape'][2:]) else 'contiguous'
    mode = ('train' if call['train'] else 'eval') + (
        '+bwd' if call['input_grad'] or call['param_grad'] else '')
    return dict(layer=layer, shape='x'.join(map(str, call['shape'])), layout=layout, mode=mode,
                source=call['sources'][0])


def select(calls, smoke: bool, limit: int = None):
    """``(index, call, dtype)`` to replay and the count skipped (see the docstring). The
    smoke run takes small calls with a map: the first of SN and SW in training and in
    inference, and the first channels_last one; the first in bfloat16, the others float32."""
    from mmsn.norm_calls import numel, uses_kernels
    chosen, skipped, families = [], 0, set()
    for index, call in enumerate(calls):
        dtypes = [d for d in call['dtypes'] if uses_kernels(call, d)]
        skipped += len(call['dtypes']) - len(dtypes)
        if call['world'] > 1 or not dtypes:
            skipped += len(dtypes)
            continue
        if not smoke:
            chosen += [(index, call, dtype) for dtype in dtypes]
            continue
        shape, stride = call['shape'], call['stride']
        if not (0 < numel(call) <= SMOKE_NUMEL and len(shape) > 2 and min(shape[2:]) > 1
                and shape[0] > 1):
            continue
        family = ('SW' if 'num_pergroup' in call['options'] else 'SN', call['train'],
                  stride[1] == 1)
        if family in families or (family[2] and any(f[2] for f in families)):
            continue
        families.add(family)
        chosen.append((index, call, 'bfloat16' if not chosen else 'float32'))
    return (chosen[:limit] if limit else chosen), skipped


def replay_all(items, device, deadline: float = float('inf')) -> list:
    """One row per item, until ``deadline`` (``time.time()``) passes."""
    rows = []
    for index, call, dtype in items:
        if time.time() > deadline:
            break
        row = dict(index=index, **describe(call), dtype=dtype)
        try:
            row.update(replay(call, dtype, device, seed=index))
        except Exception as error:  # a row per failure; the run goes on
            row.update(y=float('inf'), dx=float('inf'), params=float('inf'),
                       buffers=float('inf'), worst=f'{type(error).__name__}: {error}'[:200],
                       ok=False, seconds=0.0)
        rows.append(row)
    return rows


def run_jobs(args):
    """Replays in ``args.jobs`` processes (shards of the selected calls): the rows, and how
    many items were lost with a worker that died."""
    from mmsn.norm_calls import load_calls
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for shard in range(args.jobs):
            out = osp.join(tmp, f'{shard}.json')
            command = [sys.executable, osp.abspath(__file__), '--calls', args.calls,
                       '--shard', str(shard), str(args.jobs), '--rows', out,
                       '--deadline', repr(args.deadline)]
            if args.limit:
                command += ['--limit', str(args.limit)]
            if args.smoke:
                command.append('--smoke')
            procs.append((subprocess.Popen(command), out))
        rows, lost = [], 0
        for shard, (proc, out) in enumerate(procs):
            proc.wait()
            if proc.returncode == 0 and osp.exists(out):
                with open(out) as f:
                    rows += json.load(f)['rows']
            else:
                lost += len(select(load_calls(args.calls), args.smoke,
                                   args.limit)[0][shard::args.jobs])
    return sorted(rows, key=lambda r: (r['index'], r['dtype'])), lost


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', default=DEFAULT_CALLS)
    parser.add_argument('--jobs', type=positive_int, default=1)
    parser.add_argument('--limit', type=positive_int, help='replay the first N only')
    parser.add_argument('--time-limit', type=positive_int,
                        help='start no replay after this many seconds (a GPU session\'s '
                        'budget); the rest is reported as not reached')
    parser.add_argument('--csv', default=osp.join(ROOT, 'work_dirs', 'replay_norm_calls.csv'))
    parser.add_argument('--shard', type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument('--rows', help=argparse.SUPPRESS)
    parser.add_argument('--deadline', type=float, default=float('inf'), help=argparse.SUPPRESS)
    add_smoke_option(parser)
    args = parser.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cpu' and os.environ.get('TRITON_INTERPRET', '0') in ('', '0'):
        parser.error('no GPU: run the kernels in the interpreter (TRITON_INTERPRET=1)')
    from mmsn.norm_calls import load_calls
    calls = load_calls(args.calls)
    items, skipped = select(calls, args.smoke, args.limit)
    start = time.perf_counter()
    if args.shard:
        shard, shards = args.shard
        with open(args.rows, 'w') as f:
            json.dump(dict(rows=replay_all(items[shard::shards], device, args.deadline),
                           items=len(items[shard::shards])), f)
        return 0
    if args.time_limit:
        args.deadline = time.time() + args.time_limit
    if args.jobs > 1:
        rows, lost = run_jobs(args)
    else:
        rows, lost = replay_all(items, device, args.deadline), 0
    failed = [row for row in rows if not row['ok']]
    unreached = len(items) - len(rows) - lost
    if rows:
        report(rows, args.csv, f'recorded norm-layer calls, kernels against the reference '
               f'({args.calls})')
    print(f'{len(rows)} replays of {len(calls)} recorded calls in '
          f'{time.perf_counter() - start:.0f} s: {len(rows) - len(failed)} passed, '
          f'{len(failed)} failed, {lost} lost (a worker died), {unreached} not reached in '
          f'the time limit, {skipped} skipped (world > 1, or not a kernel call)')
    for row in failed:
        print(f"  FAILED #{row['index']} {row['layer']} {row['shape']} {row['layout']} "
              f"{row['dtype']} {row['mode']} [{row['source']}]: {row['worst']}")
    return 1 if failed or lost else 0


if __name__ == '__main__':
    sys.exit(main())
