"""Every benchmark script runs its ``--smoke`` mode: tiny shapes, one repeat, mmsn's kernels
included (interpreted on the CPU), every pass and option a GPU run takes (the compiled
ResNet-50 step aside: tests/test_compile.py covers its code path). A GPU run can then only
fail for GPU reasons."""
import csv
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_smoke(script, tmp_path, *args):
    out = tmp_path / 'rows.csv'
    env = dict(os.environ, TRITON_INTERPRET='1')
    env.pop('MMSN_BACKEND', None)
    run = subprocess.run([sys.executable, osp.join(ROOT, 'benchmarks', script), '--smoke',
                          '--csv', str(out), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with open(out) as f:
        return list(csv.DictReader(f))


# The sweep over dtypes and layouts is bench_switch_norm.py's (both scripts run it): smoked in
# full there; the SW script's smoke takes one dtype and layout (its kernels under the
# interpreter cost a minute per combination).
SW_SMOKE = ('--dtypes', 'bfloat16', '--layouts', 'channels_last')


@pytest.mark.slow
@pytest.mark.parametrize('script,args,column,expected', [
    ('bench_switch_norm.py', (), 'op',
     {'mmsn-triton', 'mmsn-torch', 'BatchNorm2d', 'GroupNorm32'}),
    ('bench_switch_whiten.py', SW_SMOKE, 'op',
     {'SW2-16 mmsn-triton', 'SW5-16 mmsn-triton', 'SW2-16 mmsn-torch', 'SW5-16 mmsn-torch',
      'BatchNorm2d'}),
    ('bench_host_overhead.py', (), 'layer',
     {'BN', 'GN', 'SN (kernels)', 'SN (reference)', 'SW-16 (kernels)', 'SW-64 (kernels)'}),
])
def test_layer_benchmarks_smoke(script, args, column, expected, tmp_path):
    pytest.importorskip('triton')
    rows = run_smoke(script, tmp_path, *args)
    assert {row[column] for row in rows} == expected
    if script == 'bench_switch_norm.py':
        assert {row['layout'] for row in rows} == {'nchw', 'channels_last'}
        assert {row['dtype'] for row in rows} == {'float32', 'bfloat16'}
    if script != 'bench_host_overhead.py':
        assert {row['pass_'] for row in rows} == {'forward', 'backward', 'forward+backward'}


@pytest.mark.slow
def test_resnet50_step_smoke(tmp_path):
    pytest.importorskip('triton')
    rows = run_smoke('bench_resnet50_step.py', tmp_path)
    assert [row['model'] for row in rows] == [
        f'ResNet-50 {kind}' for kind in ('bn', 'gn', 'sn@triton', 'sw7@triton')]


@pytest.mark.slow
def test_deploy_and_import_smoke(tmp_path):
    pytest.importorskip('mmcv')
    rows = run_smoke('deploy_hard_ratios.py', tmp_path)
    assert len(rows) == 6 and rows[1]['model'] == 'SN, soft ratios'
    rows = run_smoke('bench_import.py', tmp_path)
    assert [row['imports'] for row in rows] == ['torch + mmengine registry', 'mmsn']


def test_counts_of_zero_are_refused_by_name(capsys, monkeypatch):
    monkeypatch.syspath_prepend(osp.join(ROOT, 'benchmarks'))
    import bench_host_overhead
    with pytest.raises(SystemExit) as exit_info:
        bench_host_overhead.main(['--rounds', '0'])
    assert exit_info.value.code == 2
    assert 'argument --rounds: expected a positive integer, got 0' in capsys.readouterr().err


@pytest.mark.slow
def test_replay_of_recorded_calls_smoke(tmp_path):
    """The GPU replay of tests/data/norm_calls.json (benchmarks/replay_norm_calls.py) on a
    few small recorded calls, kernels interpreted, in 2 worker processes as on a GPU."""
    pytest.importorskip('triton')
    rows = run_smoke('replay_norm_calls.py', tmp_path, '--jobs', '2')
    assert rows and all(row['ok'] == 'True' for row in rows)
    assert {row['layer'].split('-')[0] for row in rows} >= {'SwitchNorm2d', 'SwitchWhiten2d'}
    assert {row['mode'] for row in rows} >= {'train+bwd', 'eval'}
    assert 'bfloat16' in {row['dtype'] for row in rows}
