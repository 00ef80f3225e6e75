"""The kernels compiled ahead of time for real GPUs (sm_80, sm_90) with Triton's compiler
and ptxas, no GPU needed: ``mmsn.ops.aot`` records the launches the layers really make at
ResNet-50 shapes (the planning code, kernels not run), compiles each distinct one and reads
registers and stack from the cubin. Runs in a subprocess: the kernels must be compiled, not
interpreted (conftest sets TRITON_INTERPRET=1 for this process).

What is enforced here (a representative subset, within two minutes on 2 cores): every
launch of SN and of SW at 16, 32 and 64 channels per group compiles for both architectures,
within its register budget, without spills or stack.
``python -m mmsn.ops.aot`` runs the whole sweep and lists every problem.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('triton')

SUBSET = ['--batches', '2', '32', '--dtypes', 'float32', 'bfloat16', 'float16',
          '--layouts', 'nchw', 'channels_last', '--shapes', '64x112x112', '256x56x56',
          '512x7x7', '2048x7x7']


def run_check(tmp_path, kinds, architectures, subset=SUBSET):
    out = tmp_path / 'rows.json'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run(
        [sys.executable, '-m', 'mmsn.ops.aot', '--kinds', *kinds, '--archs', *architectures,
         '--json', str(out), *subset], env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_sn_kernels_compile_within_budget(tmp_path):
    from mmsn.ops.aot import problems
    rows = run_check(tmp_path, ['sn'], ['80', '90'])
    kernels = {row['kernel'] for row in rows}
    assert kernels == {'_moments_kernel', '_affine_kernel', '_grad_sums_kernel',
                       '_grad_input_kernel', '_mix_forward_kernel', '_mix_backward_kernel'}
    assert {row['dtypes'] for row in rows} >= {'*fp32', '*bf16, *fp32', '*fp16, *fp32'}
    assert not [row for row in rows if row['error']]
    assert problems(rows) == []


def test_sw_kernels_compile_within_budget(tmp_path):
    """SW at 16, 32 and 64 channels per group (Newton's forward in registers at 16 and
    32, through scratch memory at 64 and in every backward), three dtypes, both layouts,
    maps of 56x56 and 14x14 (the SW placements whiten stages 1-3 only; 64 channels: one
    group of 64, whose count Triton
    passes as a constexpr; every shape is in the full sweep of
    ``python -m mmsn.ops.aot``): no spill, no stack, within budget on sm_80 and sm_90."""
    from mmsn.ops.aot import problems
    rows = run_check(tmp_path, ['sw16', 'sw32', 'sw64'], ['80', '90'],
                     subset=['--batches', '8', '--dtypes', 'float32', 'bfloat16', 'float16',
                             '--layouts', 'nchw', 'channels_last',
                             '--shapes', '256x56x56', '1024x14x14', '64x56x56'])
    assert {row['kernel'] for row in rows} == {
        '_group_moments_kernel', '_whiten_kernel', '_whiten_grad_sums_kernel',
        '_whiten_grad_input_kernel', '_sw_batch_kernel', '_sw_mix_kernel',
        '_sw_mix_backward_kernel', '_sw_batch_backward_kernel',
        '_sw_input_coefficients_kernel'}
    assert {'C_PER=64' in row['constexprs'] for row in rows} == {True, False}
    assert [row['error'] for row in rows if row['error']] == []
    assert problems(rows) == []
