"""Ahead-of-time compilation of the launches mmsn makes, for real GPUs, without one.

Triton's interpreter runs the kernels on the CPU but compiles nothing, so it cannot show
compile errors, register pressure, spills or grids a GPU refuses. This module replays layer
calls plan-only (through :func:`~mmsn.ops.launching.observe_launches`: the real planning
code, no kernel run, tensors allocated but never touched), binds each launch exactly as
Triton's launcher binds it, compiles every distinct one with ``triton.compile`` for a
``GPUTarget`` and reads registers, stack and local memory from the cubin with the
``cuobjdump`` that Triton ships.

What is replayed:

* ``--calls FILE``: recorded layer calls (``tests/data/norm_calls.json``, see
  ``mmsn/norm_calls.py``): the shipped configs, upstream configs under ``--norm``, a sweep
  over the edge values and the largest maps; synchronized calls (``world > 1``) in a real
  gloo group of that many processes; then :data:`LARGEST_MAPS` on the meta device. This is
  what ``tests/test_kernel_resources.py`` runs.
* otherwise the original shape sweep: ResNet-50's norm shapes for SN and SW at 16/32/64
  channels per group, ``--batches``, ``--dtypes``, ``--layouts``.

Binding: Triton's launcher specializes every launch on its own argument values: an integer
equal to 1 becomes a constexpr, an integer or pointer divisible by 16 gets
``tt.divisibility=16``. Each launch here goes through Triton's own binder
(``create_function_from_signature`` and ``JITFunction._pack_args``, as in
``JITFunction.run``) and launches are deduplicated by the resulting key (kernel, argument
types, constexprs, attributes, ``num_warps`` and ``maxnreg``), so every variant a GPU would
compile is compiled. Each architecture is planned for its GPU: sm_80 as an A100 (108 SMs),
sm_90 as an H100 (132 SMs); the SM count decides how reductions split, so the launches
differ.

What fails (:func:`problems`): a compile error; any stack or local memory (spills);
registers over the kernel's budget, or more than a block's 64K registers; shared memory
over what a block may opt into (A100 163 KiB, H100 227 KiB: Triton opts into the device's
maximum); a grid over CUDA's limits (x < 2^31, y and z <= 65535; Triton's launcher also
multiplies the three in a C ``int`` and skips the launch when that is not positive).

Register budget (``register_budget`` in ``mmsn/ops/launching.py``; each launch passes ptxas
the most registers a block allows, ``register_cap``, so the budget is checked here, not
imposed), and why: the streaming passes are memory-bound and need many bytes in
flight per SM; at 128 registers per thread an SM holds 512 threads (16 warps, a quarter of
its thread slots on sm_80/sm_90), which with these kernels' wide vector loads keeps enough
loads outstanding to approach bandwidth. Above that, occupancy halves again and latency is
no longer hidden. The mixing kernels (SN's one program per layer; SW's one program per group
or per instance, with Newton's iteration in registers or scratch memory) work on the
moments, not on x: they are latency-bound and may use up to 255 registers, but never spill.

Compiles run in ``--workers`` processes; each result is kept next to Triton's cache
(``<triton cache dir>/mmsn-aot``), keyed by the kernel's source hash (Triton's, with the
functions it calls), the launch key, the architecture and Triton's version, so a warm run
compiles nothing. It must run in a process without ``TRITON_INTERPRET=1`` (the kernels must
be JITFunctions): ``python -m mmsn.tools.compile_check --help``. Uses Triton internals (the
launcher's binder), pinned by ``tests/test_kernel_resources.py``.
"""
import argparse
import hashlib
import importlib
import json
import multiprocessing
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mmsn.ops.launching import BLOCK_REGISTERS, MIXING_REGISTERS, register_budget

ARCHITECTURES = (80, 90)
#: the SMs of the GPU each architecture is planned for: A100 (sm_80), H100 (sm_90)
MULTIPROCESSORS = {80: 108, 90: 132}
#: the most shared memory a block may opt into (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_
#: BLOCK_OPTIN, which Triton's loader checks against): A100 163 KiB, H100 227 KiB
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: launch options that change the binary, compiled as each launch passes them
COMPILE_OPTIONS = ('num_warps', 'num_stages', 'maxnreg')
#: CUDA's grid limits: x, y, z
MAX_GRID = (2 ** 31 - 1, 65535, 65535)
#: ResNet-50's norm shapes at 224x224 (channels, height, width)
RESNET50_SHAPES = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
                   (512, 28, 28), (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14),
                   (512, 7, 7), (2048, 7, 7)]
KINDS = ('sn', 'sw16', 'sw32', 'sw64')


def grid_problem(grid: Sequence[int]) -> Optional[str]:
    """Why a GPU would not run ``grid`` as asked (None when it would)."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    for axis, size, limit in zip('xyz', grid, MAX_GRID):
        if size > limit:
            return f'grid {grid}: {axis} = {size} over CUDA\'s {limit}'
    if grid[0] * grid[1] * grid[2] > 2 ** 31 - 1:
        return (f'grid {grid}: {grid[0] * grid[1] * grid[2]} programs overflow the int in '
                "which Triton's launcher multiplies the grid (the launch is skipped)")
    return None


# ------------------------------------------------------------------------------- binding

class LaunchSet:
    """The distinct launches seen while planning, each bound as Triton's launcher binds it.

    Use :meth:`observe` as the observer of :func:`~mmsn.ops.launching.observe_launches`
    (it returns False: plan only); set :attr:`case` to name what is being planned.

    Attributes:
        launches (dict): key -> ``dict(kernel, signature, constexprs, attrs, options,
            example)``; ``example`` names the first case that made the launch.
        grid_problems (dict): ``(kernel name, problem) -> example`` for grids over CUDA's
            limits.
        count (int): launches observed.
    """

    def __init__(self):
        self.launches: Dict[tuple, dict] = {}
        self.grid_problems: Dict[Tuple[str, str], str] = {}
        self.count = 0
        self.case = ''
        self._binders = {}
        self._backend = None

    def observe(self, kernel, grid, arguments) -> bool:
        import triton
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise RuntimeError('mmsn.tools.compile_check needs compiled kernels: unset '
                               'TRITON_INTERPRET')
        if self._backend is None:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            self._backend = make_backend(GPUTarget('cuda', ARCHITECTURES[-1], 32))
        if kernel not in self._binders:
            from triton.runtime.jit import create_function_from_signature
            self._binders[kernel] = create_function_from_signature(
                kernel.signature, kernel.params, self._backend)
        bound, specialization, parsed = self._binders[kernel](**arguments)
        _, signature, constexprs, attrs = kernel._pack_args(self._backend, arguments, bound,
                                                            specialization, parsed)
        self.count += 1
        compile_options = {k: arguments[k] for k in COMPILE_OPTIONS
                           if arguments.get(k) is not None}
        self.launches.setdefault(launch_key(kernel, signature, constexprs, attrs,
                                            compile_options),
                                 dict(kernel=kernel, signature=signature, constexprs=constexprs,
                                      attrs=attrs, options=compile_options,
                                      example=self.case))
        problem = grid_problem(grid)
        if problem:
            self.grid_problems.setdefault((kernel.__name__, problem), self.case)
        return False  # plan only: nothing runs

    def update(self, other: 'LaunchSet') -> None:
        for key, launch in other.launches.items():
            self.launches.setdefault(key, launch)
        for key, example in other.grid_problems.items():
            self.grid_problems.setdefault(key, example)
        self.count += other.count


def launch_key(kernel, signature, constexprs, attrs, compile_options) -> tuple:
    """What Triton compiles one binary for: kernel, argument types, constexpr values,
    per-argument attributes (divisibility) and the compile options (warps, register cap)."""
    return (f'{kernel.__module__}:{kernel.__name__}', tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in constexprs.items())),
            tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
            tuple(sorted(compile_options.items())))


def _forced_kernels():
    """The kernels forced inside (the previous backend restored after)."""
    from mmsn.ops import use_backend
    return use_backend('triton')


# ----------------------------------------------------------------- planning recorded calls

def replay_plan_only(record: dict, dtype: str, rank: int = 0) -> None:
    """One recorded call (``mmsn/norm_calls.py``) forward and, where it had one, backward,
    with launches observed but not run."""
    from mmsn.norm_calls import build_layer, make_input, needs_backward
    layer = build_layer(record, dtype)
    x = make_input(record, dtype, rank=rank)
    with torch.set_grad_enabled(needs_backward(record)):
        y = layer(x)
    if y.requires_grad:
        y.backward(torch.empty_like(y))


def _kernel_calls(calls: Iterable[dict]) -> List[dict]:
    """The calls, each with only the dtypes in which it runs on the kernels."""
    from mmsn.norm_calls import uses_kernels
    kept = [dict(call, dtypes=[d for d in call['dtypes'] if uses_kernels(call, d)])
            for call in calls]
    return [call for call in kept if call['dtypes']]


#: the largest maps, planned on the meta device beside the recorded calls (what the
#: recording leaves out): channels_last volumes and maps whose blocks of L pass 65535 (grid
#: axes 1 and 2 would stop there), and maps of 2**30 positions (64-bit positions), in
#: bfloat16 (AMP's activations; the dtypes themselves are the records' business):
#: (layer, options, shape, channels_last)
LARGEST_MAPS = [
    ('SwitchNorm3d', dict(num_features=64), (1, 64, 128, 128, 128), True),
    ('SwitchNorm2d', dict(num_features=256), (1, 256, 1024, 2048), True),
    ('SwitchWhiten2d', dict(num_features=64, num_pergroup=64), (1, 64, 1024, 1056), False),
    ('SwitchWhiten2d', dict(num_features=64, num_pergroup=64), (1, 64, 1024, 1056), True),
    ('SwitchNorm2d', dict(num_features=2), (1, 2, 32768, 32768), False),
    ('SwitchWhiten2d', dict(num_features=16, num_pergroup=16), (1, 16, 32768, 32768), False),
    ('SwitchWhiten2d', dict(num_features=32, num_pergroup=32), (1, 32, 32768, 32768), False),
    ('SwitchWhiten2d', dict(num_features=64, num_pergroup=64), (1, 64, 32768, 32768), True),
]


def plan_largest_maps(architectures: Sequence[int] = ARCHITECTURES) -> Dict[int, LaunchSet]:
    """:data:`LARGEST_MAPS` plan-only, a training step and an eval forward each, on the meta
    device (no memory: the plan needs shapes, strides and addresses only)."""
    from mmsn import layers
    from mmsn.ops.launching import observe_launches
    plans = {}
    for arch in architectures:
        launches = plans[arch] = LaunchSet()
        with _forced_kernels(), observe_launches(launches.observe,
                                                 multiprocessors=MULTIPROCESSORS[arch]):
            for name, options, shape, channels_last in LARGEST_MAPS:
                layer = getattr(layers, name)(**options).to('meta')
                memory_format = torch.contiguous_format
                if channels_last:
                    memory_format = torch.channels_last_3d if len(shape) == 5 else \
                        torch.channels_last
                launches.case = (f'{name}({options["num_features"]}) '
                                 f'{"x".join(map(str, shape))} bfloat16'
                                 f'{" channels_last" if channels_last else ""} [largest maps]')
                step_and_eval(layer, torch.empty(shape, dtype=torch.bfloat16, device='meta',
                                                 memory_format=memory_format))
    return plans


def plan_calls(calls: Sequence[dict], architectures: Sequence[int] = ARCHITECTURES
               ) -> Dict[int, LaunchSet]:
    """Replays ``calls`` plan-only once per architecture (its GPU's SM count); calls of a
    synchronized layer with ``world > 1`` go to :func:`plan_sync_calls`."""
    from mmsn.ops.launching import observe_launches
    plans = {}
    local = [c for c in _kernel_calls(calls) if c['world'] == 1]
    for arch in architectures:
        launches = plans[arch] = LaunchSet()
        with _forced_kernels(), observe_launches(launches.observe,
                                                 multiprocessors=MULTIPROCESSORS[arch]):
            for call in local:
                for dtype in call['dtypes']:
                    launches.case = _case_name(call, dtype)
                    replay_plan_only(call, dtype)
    synced = [c for c in _kernel_calls(calls) if c['world'] > 1]
    for world in sorted({c['world'] for c in synced}):
        for arch, launches in plan_sync_calls([c for c in synced if c['world'] == world],
                                              world, architectures).items():
            plans[arch].update(launches)
    return plans


#: options not named in a case's name when they have these values
_DEFAULT_OPTIONS = dict(momentum=0.1, affine=True, using_bn=True, T=5, tie_weight=False,
                       method='newton')


def _case_name(call: dict, dtype: str, rank: int = 0) -> str:
    """What made a launch, for the report: layer, input, dtype, layout, mode, source."""
    options = call['options']
    named = [f'{k}={v}' for k, v in options.items()
             if k != 'num_features' and _DEFAULT_OPTIONS.get(k, object()) != v]
    shape, stride = call['shape'], call['stride']
    layout = ' channels_last' if len(shape) > 2 and stride[1] == 1 and shape[1] > 1 and \
        any(s > 1 for s in shape[2:]) else ''
    mode = ('train' if call['train'] else 'eval') + ('+backward' if call['input_grad'] or
                                                     call['param_grad'] else '')
    where = f' rank {rank} of {call["world"]}' if call['world'] > 1 else ''
    more = f' +{len(call["sources"]) - 1}' if len(call['sources']) > 1 else ''
    return (f'{call["layer"]}({", ".join([str(options["num_features"])] + named)}) '
            f'{"x".join(map(str, shape))} {dtype}{layout} {mode}{where} '
            f'[{call["sources"][0]}{more}]')


def _plan_rank(rank: int, world: int, port: int, calls: List[dict],
               architectures: Sequence[int], out: str) -> None:
    import torch.distributed as dist
    from datetime import timedelta

    from mmsn.ops.launching import observe_launches
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    plans = {}
    for arch in architectures:
        launches = plans[arch] = LaunchSet()
        with _forced_kernels(), observe_launches(launches.observe,
                                                 multiprocessors=MULTIPROCESSORS[arch]):
            for call in calls:  # the same calls in the same order on every rank
                for dtype in call['dtypes']:
                    launches.case = _case_name(call, dtype, rank)
                    replay_plan_only(call, dtype, rank)
    dist.barrier()
    dist.destroy_process_group()
    with open(out, 'wb') as f:
        pickle.dump({arch: _portable(launches) for arch, launches in plans.items()}, f)


def _portable(launches: LaunchSet) -> dict:
    """A LaunchSet that pickles: kernels by module and name."""
    return dict(count=launches.count, grid_problems=launches.grid_problems,
                launches={key: dict(launch, kernel=key[0])
                          for key, launch in launches.launches.items()})


def _restore(portable: dict) -> LaunchSet:
    launches = LaunchSet()
    launches.count, launches.grid_problems = portable['count'], portable['grid_problems']
    for key, launch in portable['launches'].items():
        module, name = launch['kernel'].split(':')
        launches.launches[key] = dict(launch, kernel=getattr(importlib.import_module(module),
                                                             name))
    return launches


def _plan_rank_main(rank, world, port, calls, architectures, outs):
    _plan_rank(rank, world, port, calls, architectures, outs[rank])


def plan_sync_calls(calls: Sequence[dict], world: int,
                    architectures: Sequence[int] = ARCHITECTURES) -> Dict[int, LaunchSet]:
    """Replays calls of synchronized layers plan-only in a real gloo group of ``world``
    processes (their stages and collectives run; the kernels do not), each rank with its
    recorded input."""
    import torch.multiprocessing as mp
    plans = {arch: LaunchSet() for arch in architectures}
    if not calls:
        return plans
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f'rank{r}.pkl') for r in range(world)]
        mp.start_processes(_plan_rank_main, args=(world, port, list(calls),
                                                  list(architectures), outs),
                           nprocs=world, start_method='spawn')
        for out in outs:
            with open(out, 'rb') as f:
                for arch, portable in pickle.load(f).items():
                    plans[arch].update(_restore(portable))
    return plans


# ------------------------------------------------------------------- the shape sweep (CLI)

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
                    multiprocessors: int = MULTIPROCESSORS[90]) -> Dict[tuple, dict]:
    """The distinct launches of the layers' training forward, backward and eval forward at
    the given shapes (the shape sweep).

    Returns:
        dict: ``key -> dict(kernel, signature, constexprs, attrs, options, example)``.
    """
    return _sweep(kinds, batches, dtypes, layouts, shapes, multiprocessors).launches


def _sweep(kinds, batches, dtypes, layouts, shapes, multiprocessors) -> LaunchSet:
    from mmsn.ops.launching import observe_launches
    launches = LaunchSet()
    with _forced_kernels(), observe_launches(launches.observe, multiprocessors=multiprocessors):
        for kind in kinds:
            for c, h, w in shapes:
                layer = _layer(kind, c)
                for dtype in dtypes:
                    for layout in layouts:
                        for n in batches:
                            launches.case = f'{kind} {n}x{c}x{h}x{w} {dtype} {layout}'
                            _run_case(layer, n, c, h, w, dtype, layout)
    return launches


def _run_case(layer, n, c, h, w, dtype, layout) -> None:
    memory_format = torch.channels_last if layout == 'channels_last' else torch.contiguous_format
    step_and_eval(layer, torch.empty((n, c, h, w), dtype=dtype, memory_format=memory_format))


def step_and_eval(layer, x) -> None:
    """A training step (forward, backward) and an eval forward of ``layer`` on ``x``."""
    x = x.detach().requires_grad_()
    layer.train()
    y = layer(x)
    y.backward(torch.empty_like(y))
    layer.eval()
    with torch.no_grad():
        layer(x)


# ------------------------------------------------------------------------------ compiling

def _cuobjdump() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin',
                        'cuobjdump')


_RESOURCES = re.compile(r'REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)')


def compile_resources(launch: dict, arch: int) -> dict:
    """Compiles one bound launch for ``sm_<arch>`` and reads its resource usage
    (``shared``: the larger of the cubin's static and Triton's dynamic shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    source = ASTSource(launch['kernel'], launch['signature'], launch['constexprs'],
                       launch['attrs'])
    compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32),
                              options=dict(launch['options']))
    with tempfile.NamedTemporaryFile(suffix='.cubin') as cubin:
        cubin.write(compiled.asm['cubin'])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), '-res-usage', cubin.name], check=True,
                              capture_output=True, text=True).stdout
    found = _RESOURCES.search(dump)
    if found is None:
        raise RuntimeError(f'cuobjdump printed no resource usage:\n{dump}')
    registers, stack, shared, local = (int(v) for v in found.groups())
    return dict(registers=registers, stack=stack, local=local,
                shared=max(shared, int(compiled.metadata.shared)))


def _cache_dir() -> str:
    import triton
    try:
        root = triton.knobs.cache.dir
    except AttributeError:  # older Triton
        root = os.environ.get('TRITON_CACHE_DIR',
                              os.path.join(os.path.expanduser('~'), '.triton', 'cache'))
    return os.path.join(root, 'mmsn-aot')


def _cache_file(launch: dict, arch: int) -> str:
    import triton
    key = launch_key(launch['kernel'], launch['signature'], launch['constexprs'],
                     launch['attrs'], launch['options'])
    text = repr((triton.__version__, launch['kernel'].cache_key, key, arch))
    return os.path.join(_cache_dir(), hashlib.sha256(text.encode()).hexdigest() + '.json')


_JOBS: List[Tuple[dict, int]] = []


def _compile_job(index: int) -> dict:
    launch, arch = _JOBS[index]
    cached = _cache_file(launch, arch)
    try:
        with open(cached) as f:
            return dict(json.load(f), cached=True)
    except (OSError, ValueError):
        pass
    try:
        result = dict(compile_resources(launch, arch), error=None)
    except Exception as error:  # reported per launch; the caller fails on any
        result = dict(registers=None, stack=None, shared=None, local=None,
                      error=f'{type(error).__name__}: {error}'.strip()[:2000])
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    partial = f'{cached}.{os.getpid()}'
    with open(partial, 'w') as f:
        json.dump(result, f)
    os.replace(partial, cached)
    return dict(result, cached=False)


def _warm_up_hashes(launches: Sequence[dict]) -> None:
    """Triton's hash of itself and of each kernel's source, once here rather than in every
    worker (they inherit them through fork)."""
    try:
        from triton.runtime.cache import triton_key
        triton_key()
    except ImportError:  # another Triton: each worker hashes for itself
        pass
    for kernel in {launch['kernel'] for launch in launches}:
        getattr(kernel, "cache_key")  # (computed once, kept on the kernel)


def _describe_attrs(launch: dict) -> str:
    """The launch's specialisation: integer arguments equal to 1 (passed as constants),
    integers divisible by 16, and how many pointers are."""
    kernel = launch['kernel']
    names = kernel.arg_names
    declared = {i for i, param in enumerate(kernel.params) if param.is_constexpr}
    ones = [names[k[0]] for k in launch['constexprs']
            if isinstance(k, tuple) and k[0] not in declared]
    divisible = {names[k[0]] for k, v in launch['attrs'].items()
                 if any(a[0] == 'tt.divisibility' for a in v)}
    pointers = [n for n in names if launch['signature'][n].startswith('*')]
    ints = sorted(divisible - set(pointers), key=names.index)
    return (f"=1: {','.join(ones) or '-'}; %16: {','.join(ints) or '-'}, "
            f'{len(divisible & set(pointers))}/{len(pointers)} pointers')


def check(launches, architectures: Sequence[int] = ARCHITECTURES,
          workers: int = 2) -> List[dict]:
    """Compiles every launch for its architecture (``workers`` processes) and returns one
    row per (launch, architecture) with its resources and the budget it is held to.

    Args:
        launches: ``{arch: LaunchSet}`` (from :func:`plan_calls`) or one ``{key: launch}``
            dict compiled for every architecture.
    """
    global _JOBS
    if isinstance(launches, dict) and launches and all(isinstance(v, LaunchSet)
                                                       for v in launches.values()):
        _JOBS = [(launch, arch) for arch in architectures
                 for launch in launches[arch].launches.values()]
    else:
        _JOBS = [(launch, arch) for launch in launches.values() for arch in architectures]
    _warm_up_hashes([launch for launch, _ in _JOBS])
    # the longest compiles (SW mixing kernels) first, so that no worker is left with them
    order = sorted(range(len(_JOBS)), key=lambda i: register_budget(_JOBS[i][0]['kernel'])
                   != MIXING_REGISTERS)
    if workers > 1:
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            results = dict(zip(order, pool.map(_compile_job, order, chunksize=1)))
    else:
        results = {i: _compile_job(i) for i in order}
    rows = []
    for index, (launch, arch) in enumerate(_JOBS):
        name = launch['kernel'].__name__
        names = launch['kernel'].arg_names
        declared = {i for i, param in enumerate(launch['kernel'].params) if param.is_constexpr}
        tiles = {names[k[0]]: v for k, v in launch['constexprs'].items()
                 if isinstance(k, tuple) and k[0] in declared}
        rows.append(dict(
            kernel=name, arch=f'sm_{arch}', num_warps=launch['options']['num_warps'],
            maxnreg=launch['options'].get('maxnreg'),
            constexprs=', '.join(f'{k}={v}' for k, v in sorted(tiles.items())),
            specialization=_describe_attrs(launch),
            dtypes=', '.join(sorted({t for t in launch['signature'].values()
                                     if t.startswith('*')})),
            budget=register_budget(launch['kernel']), shared_limit=SHARED_MEMORY_LIMIT.get(arch),
            example=launch['example'], **results[index]))
    return rows


def problems(rows: List[dict], grid_problems: Optional[Dict[Tuple[str, str], str]] = None
             ) -> List[str]:
    """What fails the check: compile errors, any stack or local memory, registers over the
    budget or over a block's registers, shared memory over the architecture's limit, and
    (``grid_problems`` from planning) grids over CUDA's limits."""
    found = []
    for row in rows:
        where = f"{row['kernel']} [{row['constexprs']}; {row['specialization']}; " \
                f"num_warps={row['num_warps']}" + \
                (f", maxnreg={row['maxnreg']}" if row.get('maxnreg') else '') + \
                f"; {row['arch']}] (first made by {row['example']})"
        if row['error']:
            found.append(f'{where}: does not compile: {row["error"].splitlines()[0]}')
            continue
        if row['stack'] or row['local']:
            found.append(f"{where}: spills ({row['stack']} stack, {row['local']} local "
                         'bytes per thread)')
        if row['registers'] > row['budget']:
            found.append(f"{where}: {row['registers']} registers, over its budget of "
                         f"{row['budget']}")
        if row['registers'] * row['num_warps'] * 32 > BLOCK_REGISTERS:
            found.append(f"{where}: {row['registers']} registers x {row['num_warps'] * 32} "
                         f'threads, over a block\'s {BLOCK_REGISTERS}')
        if row.get('shared_limit') and row['shared'] > row['shared_limit']:
            found.append(f"{where}: {row['shared']} bytes of shared memory, over the "
                         f"{row['shared_limit']} a block may use")
    for (kernel, problem), example in sorted((grid_problems or {}).items()):
        found.append(f'{kernel}: {problem} (first made by {example})')
    return found


def _print_rows(rows: List[dict]) -> None:
    for row in sorted(rows, key=lambda r: (r['kernel'], r['arch'], -(r['registers'] or 0))):
        print(f"{row['kernel']:<30} {row['arch']} warps={row['num_warps']} "
              f"regs={row['registers']} stack={row['stack']} shared={row['shared']} "
              f"[{row['constexprs']}] [{row['specialization']}] {row['dtypes']}"
              + (f" ERROR {row['error'].splitlines()[0]}" if row['error'] else ''))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', help='replay the recorded layer calls of this file '
                        '(tests/data/norm_calls.json) instead of the shape sweep')
    parser.add_argument('--kinds', nargs='+', default=list(KINDS))
    parser.add_argument('--batches', type=int, nargs='+', default=[2, 8, 32])
    parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--layouts', nargs='+', default=['nchw', 'channels_last'])
    parser.add_argument('--shapes', nargs='+', help='CxHxW (default: all of ResNet-50)')
    parser.add_argument('--archs', type=int, nargs='+', default=list(ARCHITECTURES))
    parser.add_argument('--workers', type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument('--json', help='write the rows and the problems here')
    parser.add_argument('--quiet', action='store_true', help='print no per-launch rows')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        parser.error('unset TRITON_INTERPRET: the kernels must be compiled, not interpreted')
    unknown = [a for a in args.archs if a not in MULTIPROCESSORS]
    if unknown:
        parser.error(f'--archs: expected some of {sorted(MULTIPROCESSORS)}, got {unknown}')
    start = time.time()
    if args.calls:
        from mmsn.norm_calls import load_calls
        calls = load_calls(args.calls)
        plans = plan_calls(calls, args.archs)
        for arch, launches in plan_largest_maps(args.archs).items():
            plans[arch].update(launches)
        what = f'{len(calls)} recorded calls and {len(LARGEST_MAPS)} largest maps'
    else:
        shapes = RESNET50_SHAPES if not args.shapes else \
            [tuple(int(v) for v in shape.split('x')) for shape in args.shapes]
        plans = {arch: _sweep(args.kinds, args.batches, [getattr(torch, d) for d in args.dtypes],
                              args.layouts, shapes, MULTIPROCESSORS[arch])
                 for arch in args.archs}
        what = 'the shape sweep'
    planned = time.time() - start
    grid_problems = {}
    for launches in plans.values():
        grid_problems.update(launches.grid_problems)
    rows = check(plans, args.archs, workers=args.workers)
    if not args.quiet:
        _print_rows(rows)
    found = problems(rows, grid_problems)
    compiled = sum(not row['cached'] for row in rows)
    print(f"{what}: {sum(p.count for p in plans.values())} launches planned in {planned:.0f} s; "
          f"{len(rows)} distinct ones over {len(plans)} architectures ({compiled} compiled, "
          f"{len(rows) - compiled} from the cache) in {time.time() - start - planned:.0f} s; "
          f'{len(found)} problems')
    for problem in found:
        print('  ' + problem)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(rows=rows, problems=found), f, indent=1, default=str)
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
