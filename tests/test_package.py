"""The package outside the checkout: the wheel, installed into a fresh virtual environment
in a temporary folder, trains a config that inherits a shipped one (``mmsn::``) through
its console script, exports the trained checkpoint to ONNX and converts a checkpoint.

The environment gets mmsn from the wheel alone (``pip install --no-deps``, not the
checkout's editable install) and its dependencies from the ones ``make test`` installed
into ``.venv`` (a ``.pth`` line naming that site-packages: no download, no build).
"""
import os
import os.path as osp
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(command, cwd, timeout, **env):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=dict({k: v for k, v in os.environ.items()
                                      if k not in ('PYTHONPATH', 'TRITON_INTERPRET')}, **env))
    assert result.returncode == 0, (' '.join(map(str, command)) + '\n' + result.stdout[-3000:]
                                    + result.stderr[-3000:])
    return result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_trains_exports_and_converts_a_config_that_inherits_a_shipped_one(tmp_path):
    pytest.importorskip('mmseg')
    pytest.importorskip('mmdet')
    wheels = tmp_path / 'wheels'
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
         '-w', str(wheels), ROOT], cwd=tmp_path, timeout=300)
    wheel, = wheels.glob('mmsn-*.whl')
    venv = tmp_path / 'venv'
    run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], cwd=tmp_path, timeout=120)
    python = venv / 'bin' / 'python'
    run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '-q',
         str(wheel)], cwd=tmp_path, timeout=300)
    site = run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
               cwd=tmp_path, timeout=60).strip()
    with open(osp.join(site, 'checkout_dependencies.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')

    work = tmp_path / 'user'
    work.mkdir()
    where = run([str(python), '-c', 'import mmsn; print(mmsn.__file__)'], cwd=work,
                timeout=120).strip()
    assert where.startswith(str(venv)), where  # the wheel's mmsn, not the checkout's
    run([str(python), '-c', "from mmsn.demo.shapes import make_shapes_dataset as m; "
         "m('data/shapes', num_train=8, num_val=4)"], cwd=work, timeout=120)
    (work / 'my_config.py').write_text(textwrap.dedent('''
        _base_ = 'mmsn::demo/fcn_r18-sn_shapes.py'
        train_dataloader = dict(batch_size=2)
        train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2)
        default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2))
    '''))
    run([str(venv / 'bin' / 'mmsn-train'), 'my_config.py', '--work-dir', 'work'], cwd=work,
        timeout=400)
    assert (work / 'work' / 'iter_2.pth').exists()

    # the trained checkpoint exported to ONNX and run in onnxruntime against PyTorch
    out = run([str(venv / 'bin' / 'mmsn-export-onnx'), 'my_config.py', 'work/iter_2.pth',
               '--out', 'fcn.onnx', '--shape', '64', '64'], cwd=work, timeout=300)
    assert (work / 'fcn.onnx').exists() and 'max abs diff' in out, out

    # the converter, on an open-mmlab BN ResNet-18 checkpoint (BN -> SN, uniform ratios)
    run([str(python), '-c', textwrap.dedent('''
        import torch
        from mmdet.models import ResNet
        torch.save({'state_dict': ResNet(depth=18).state_dict()}, 'resnet18_bn.pth')
    ''')], cwd=work, timeout=120)
    out = run([str(venv / 'bin' / 'mmsn-sn2mm'), 'resnet18_bn.pth', 'resnet18_sn.pth'],
              cwd=work, timeout=300)
    assert (work / 'resnet18_sn.pth').exists(), out
