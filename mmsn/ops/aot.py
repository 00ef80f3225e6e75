"""Ahead-of-time compilation of the launches mmsn makes, for real GPUs, without one.

Triton's interpreter runs the kernels on the CPU but compiles nothing, so it cannot show
compile errors, register pressure or spills. This module records the launches the layers
make at given shapes (through :func:`~mmsn.ops.library.observe_launches`, kernels not run),
binds each one exactly as Triton's launcher does (argument types, constexprs, divisibility
specialisation, ``num_warps``), compiles every distinct one with ``triton.compile`` for a
``GPUTarget`` and reads registers, stack (spills) and shared memory from the cubin with the
``cuobjdump`` that Triton ships.

It must run in a process without ``TRITON_INTERPRET=1`` (the kernels must be JITFunctions):
``python -m mmsn.ops.aot --help``. Uses Triton internals (the launcher's binder), pinned by
``tests/test_kernel_resources.py``.

Register budget, and why: the streaming passes are memory-bound and need many bytes in
flight per SM; at 128 registers per thread an SM holds 512 threads (16 warps, a quarter of
its thread slots on sm_80/sm_90), which with these kernels' wide vector loads keeps enough
loads outstanding to approach bandwidth. Above that, occupancy halves again and latency is
no longer hidden. The mixing kernels (SN's one program per layer; SW's one program per group
or per instance, with Newton's iteration in registers or scratch memory) work on the
moments, not on x: they are latency-bound and may use up to 255 registers, but never spill.
"""
import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

#: streaming kernels: at most this many registers per thread (see the module docstring)
STREAMING_REGISTER_BUDGET = 128
#: the mixing kernels, which read the moments, not x (see the module docstring)
MIXING_KERNELS = ('_mix_forward_kernel', '_mix_backward_kernel', '_sw_batch_kernel',
                  '_sw_mix_kernel', '_sw_mix_backward_kernel', '_sw_batch_backward_kernel',
                  '_sw_input_coefficients_kernel')
ARCHITECTURES = (80, 90)
#: ResNet-50's norm shapes at 224x224 (channels, height, width)
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
                   (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
                   (512, 7, 7), (2048, 7, 7)]
KINDS = ('sn', 'sw16', 'sw32', 'sw64')


def register_budget(kernel_name: str) -> int:
    return 255 if kernel_name in MIXING_KERNELS else STREAMING_REGISTER_BUDGET


def _layer(kind: str, channels: int):
    import mmsn
    if kind == 'sn':
        return mmsn.SwitchNorm2d(channels)
    return mmsn.SwitchWhiten2d(channels, num_pergroup=int(kind[2:]), sw_type=5)


def record_launches(kinds: Sequence[str] = KINDS, batches: Sequence[int] = (2, 8, 32),
                    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16,
                                                     torch.float16),
                    layouts: Sequence[str] = ('nchw', 'channels_last'),
                    shapes: Iterable[Tuple[int, int, int]] = RESNET50_SHAPES,
                    multiprocessors: int = 132) -> Dict[tuple, dict]:
    """The distinct launches of the layers' training forward, backward and eval forward.

    Returns:
        dict: ``key -> dict(kernel, signature, constexprs, attrs, num_warps, example)`` with
        ``example`` naming the first case that made the launch.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from .library import observe_launches
    backend = make_backend(GPUTarget('cuda', ARCHITECTURES[-1], 32))
    binders = {}
    launches: Dict[tuple, dict] = {}
    case = ['']

    def bind(kernel, grid, args, options):
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise RuntimeError('mmsn.ops.aot needs compiled kernels: unset TRITON_INTERPRET')
        if kernel not in binders:
            binders[kernel] = create_function_from_signature(kernel.signature, kernel.params,
                                                             backend)
        bound, specialization, parsed = binders[kernel](*args, **options)
        _, signature, constexprs, attrs = kernel._pack_args(backend, options, bound,
                                                            specialization, parsed)
        # one compile per kernel, argument types, constexprs and warps: the divisibility
        # hints (attrs) of the first such launch stand for the rest (they change address
        # arithmetic, not the tile's registers), which keeps the check within minutes
        key = (kernel.__name__, tuple(sorted(signature.items())),
               tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
               options['num_warps'])
        launches.setdefault(key, dict(kernel=kernel, signature=signature, constexprs=constexprs,
                                      attrs=attrs, num_warps=options['num_warps'],
                                      example=case[0]))
        return False  # plan only: nothing runs

    saved = os.environ.get('MMSN_BACKEND')
    os.environ['MMSN_BACKEND'] = 'triton'
    try:
        with observe_launches(bind, multiprocessors=multiprocessors):
            for kind in kinds:
                for c, h, w in shapes:
                    layer = _layer(kind, c)
                    for dtype in dtypes:
                        for layout in layouts:
                            for n in batches:
                                case[0] = f'{kind} {n}x{c}x{h}x{w} {dtype} {layout}'
                                _run_case(layer, n, c, h, w, dtype, layout)
    finally:
        os.environ.pop('MMSN_BACKEND')
        if saved is not None:
            os.environ['MMSN_BACKEND'] = saved
    return launches


def _run_case(layer, n, c, h, w, dtype, layout) -> None:
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    x = torch.empty((n, c, h, w), dtype=dtype, memory_format=memory_format).requires_grad_()
    layer.train()
    y = layer(x)
    y.backward(torch.empty_like(y))
    layer.eval()
    with torch.no_grad():
        layer(x)


def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                        'cuobjdump')


_RESOURCES = re.compile(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)')


def compile_resources(launch: dict, arch: int) -> dict:
    """Compiles one recorded launch for ``sm_<arch>`` and reads its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    source = ASTSource(launch['kernel'], launch['signature'], launch['constexprs'],
                       launch['attrs'])
    compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32),
                              options=dict(num_warps=launch['num_warps']))
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(compiled.asm['cubin'])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), '-res-usage', cubin.name], check=True,
                              capture_output=True, text=True).stdout
    found = _RESOURCES.search(dump)
    if found is None:
        raise RuntimeError(f'cuobjdump printed no resource usage:\n{dump}')
    registers, stack, shared, local = (int(v) for v in found.groups())
    return dict(registers=registers, stack=stack, shared=shared, local=local)


_JOBS: List[Tuple[dict, int]] = []


def _compile_job(index: int) -> dict:
    launch, arch = _JOBS[index]
    try:
        return dict(compile_resources(launch, arch), error=None)
    except Exception as error:  # reported per launch; the caller fails on any
        return dict(registers=None, stack=None, shared=None, local=None,
                    error=f'{type(error).__name__}: {error}')


def check(launches: Dict[tuple, dict], architectures: Sequence[int] = ARCHITECTURES,
          workers: int = 2) -> List[dict]:
    """Compiles every launch for every architecture (``workers`` processes) and returns one
    row per (launch, architecture) with its resources and the budget it is held to."""
    global _JOBS
    _JOBS = [(launch, arch) for launch in launches.values() for arch in architectures]
    if workers > 1:
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            results = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    else:
        results = [_compile_job(i) for i in range(len(_JOBS))]
    rows = []
    for (launch, arch), result in zip(_JOBS, results):
        name = launch['kernel'].__name__
        tiles = {k: v for k, v in launch['constexprs'].items()
                 if isinstance(k, tuple) and isinstance(v, (int, bool))}
        names = launch['kernel'].arg_names
        rows.append(dict(
            kernel=name, arch=f'sm_{arch}', num_warps=launch['num_warps'],
            constexprs=', '.join(f'{names[k[0]]}={v}' for k, v in sorted(tiles.items())),
            dtypes=', '.join(sorted({t for t in launch['signature'].values()
                                     if t.startswith('*')})),
            budget=register_budget(name), example=launch['example'], **result))
    return rows


def problems(rows: List[dict]) -> List[str]:
    """What fails the check: compile errors, any stack or local memory, registers over the
    budget."""
    found = []
    for row in rows:
        where = f"{row['kernel']} [{row['constexprs']}; num_warps={row['num_warps']}; " \
                f"{row['arch']}] (first made by {row['example']})"
        if row['error']:
            found.append(f'{where}: does not compile: {row["error"]}')
        elif row['stack'] or row['local']:
            found.append(f"{where}: spills ({row['stack']} stack bytes per thread)")
        elif row['registers'] > row['budget']:
            found.append(f"{where}: {row['registers']} registers, over its budget of "
                         f"{row['budget']}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--kinds', nargs='+', default=list(KINDS))
    parser.add_argument('--batches', type=int, nargs='+', default=[2, 8, 32])
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--layouts', nargs='+', default=['nchw', 'channels_last'])
    parser.add_argument('--shapes', nargs='+', help='CxHxW (default: all of ResNet-50)')
    parser.add_argument('--archs', type=int, nargs='+', default=list(ARCHITECTURES))
    parser.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument('--json', help='write the rows here')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        parser.error('unset TRITON_INTERPRET: the kernels must be compiled, not interpreted')
    shapes = RESNET50_SHAPES if not args.shapes else \
        [tuple(int(v) for v in shape.split('x')) for shape in args.shapes]
    launches = record_launches(args.kinds, args.batches,
                               [getattr(torch, d) for d in args.dtypes], args.layouts, shapes)
    rows = check(launches, args.archs, workers=args.workers)
    for row in sorted(rows, key=lambda r: (r['kernel'], r['arch'], -(r['registers'] or 0))):
        print(f"{row['kernel']:<30} {row['arch']} warps={row['num_warps']} "
              f"regs={row['registers']} stack={row['stack']} shared={row['shared']} "
              f"[{row['constexprs']}] {row['dtypes']}" + (f" ERROR {row['error']}"
                                                          if row['error'] else ''))
    found = problems(rows)
    print(f'{len(launches)} distinct launches, {len(rows)} compiles, {len(found)} problems')
    for problem in found:
        print('  ' + problem)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
