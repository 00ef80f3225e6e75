"""The recorded norm-layer calls (``tests/data/norm_calls.json``, ``mmsn/norm_calls.py``):
the file is current, covers the shipped configs and every edge value, and every record replays as recorded.

The file is written by ``python tools/analysis_tools/record_norm_calls.py`` (minutes: it
builds and steps every recorded model); its fingerprint check here only loads configs.
"""
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmsn.norm_calls import (AMP_DTYPES, CallRecorder, build_layer, describe, load_calls,
                             make_input, record_key, uses_kernels)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CALLS = osp.join(ROOT, 'tests', 'data', 'norm_calls.json')


@pytest.fixture(scope='module')
def calls():
    return load_calls(CALLS)


@pytest.mark.slow
def test_the_file_is_current():
    """Its fingerprint (recorded configs as resolved, package versions, the recording
    code) matches the checkout: otherwise regenerate with the command it names."""
    pytest.importorskip('mmdet')
    pytest.importorskip('mmseg')
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'analysis_tools',
                                                   'record_norm_calls.py'), '--check'],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def test_the_file_covers_the_models_and_the_edge_values(calls):
    with open(CALLS) as f:
        meta = json.load(f)
    sources = {s.rsplit(':', 1)[0] for c in calls for s in c['sources']}
    # every shipped SN/SW config family, the SN demo configs, upstream configs switched
    for model in meta['models']:
        assert model in sources, model
    assert {m.split('/')[0] for m in sources if '/' in m} >= {'sn', 'sw', 'demo'}
    assert any('--norm SN' in m for m in sources) and any('--norm SW' in m for m in sources)
    modes = {s.rsplit(':', 1)[1] for c in calls for s in c['sources'] if '/' in s}
    assert {'train', 'inference', 'inference 1024x2048'} <= modes
    # model calls: float32 and what autocast hands a layer under --amp
    model_calls = [c for c in calls if not c['sources'][0].startswith('sweep:')]
    assert all(set(AMP_DTYPES) <= set(c['dtypes']) for c in model_calls)
    assert any(c['input_grad'] for c in model_calls) and any(not c['train'] for c in model_calls)
    # the edge values, each at least once, on SN and on SW
    for family in ('SN', 'SW'):
        mine = [c for c in calls if ('num_pergroup' in c['options']) == (family == 'SW')]
        assert {c['shape'][0] for c in mine} >= {1, 2, 8}, family
        lengths = {int(torch.tensor(c['shape'][2:]).prod()) for c in mine}
        assert lengths >= {0, 1, 49, 3136}, family
        assert {d for c in mine for d in c['dtypes']} == {'float64', *AMP_DTYPES}, family
        assert any(c['stride'][1] == 1 and c['shape'][2:] != [1, 1] for c in mine), family
        assert {c['options']['momentum'] is None for c in mine} == {True, False}
        assert {c['options']['affine'] for c in mine} == {True, False}
        assert {c['world'] for c in mine} == {1, 2}
    assert {c['options']['using_bn'] for c in calls if 'using_bn' in c['options']} == {
        True, False}
    assert {len(c['shape']) for c in calls if c['layer'].startswith('SwitchNorm')} == {2, 3, 4, 5}
    sw = {(c['options']['sw_type'], c['options']['num_pergroup'])
          for c in calls if 'sw_type' in c['options']}
    assert sw >= {(t, g) for t in (2, 3, 5) for g in (16, 32, 64)}
    synced = [c for c in calls if c['world'] == 2]
    assert {c['layer'] for c in synced} >= {'SyncSwitchNorm', 'SyncSwitchWhiten2d'}
    assert any(peer[0][0] == 0 for c in synced for peer in c['peers'])  # an empty rank
    # the largest maps: Cityscapes' whole image (its stem at half size) and a 3D volume
    assert any(c['shape'][2:] == [512, 1024] for c in calls)
    assert any(c['shape'] == [1, 64, 128, 128, 128] for c in calls)


def test_records_replay_as_recorded(calls):
    """Each record builds its layer and input, and describing that call gives the record
    back (so the replays see what the models saw)."""
    for call in calls:
        for dtype in call['dtypes'][:1]:
            layer = build_layer(call, dtype)
            x = make_input(call, dtype)
            with torch.set_grad_enabled(call['input_grad'] or call['param_grad']):
                again = describe(layer, x)
            again.pop('dtype')
            if call['world'] > 1:
                again['world'], again['peers'] = call['world'], call['peers']
            assert record_key(again) == record_key(call)
    # the shipped SW configs use 16 channels per group: every model call is a kernel call;
    # of the sweep's, only float64 at 64 channels per group is left to the reference
    assert all(uses_kernels(c, d) for c in calls for d in c['dtypes']
               if not c['sources'][0].startswith('sweep:'))
    refused = {(c['options']['num_pergroup'], d) for c in calls for d in c['dtypes']
               if not uses_kernels(c, d)}
    assert refused == {(64, 'float64')}


def test_recorder_merges_dtypes_and_sources():
    from mmsn import SwitchNorm2d
    recorder = CallRecorder()
    layer = SwitchNorm2d(4)
    with recorder.source('a'):
        layer(torch.randn(2, 4, 3, 3))
    with recorder.source('b'):
        layer(torch.randn(2, 4, 3, 3))
        layer.eval()
        with torch.no_grad():
            layer(torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last))
    records = recorder.calls()
    assert len(records) == 2  # (train in 'a' and 'b' alike; eval channels_last)
    train = next(r for r in records if r['train'])
    assert train['sources'] == ['a', 'b'] and train['dtypes'] == list(AMP_DTYPES)
    assert train['param_grad'] is True and train['input_grad'] is False
    layer(torch.randn(2, 4, 3, 3))  # outside a source: not recorded
    assert len(recorder.calls()) == 2
