"""Checkpoints that a kill cannot spoil, and damaged checkpoints refused with a clear error.

Saving (``mmsn.mm.checkpoint_hook``): a kill at every step of a save (simulated in-process on
a real demo Runner, and once with SIGKILL on a real ``tools/train.py``) leaves a complete
checkpoint that ``last_checkpoint`` names, and training resumes from it.

Loading (``mmsn.checkpoint``): truncation at many offsets and flipped bytes, of zip and legacy
files, give ``DamagedCheckpointError`` naming the file (never ``UntrustedCheckpointError``,
never advice to trust the file, never silently changed zip data), through the loader, mmengine,
``tools/test.py``, ``tools/train.py --resume``, the converter and the ratio tools.
"""
import os
import os.path as osp
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from mmsn import SwitchNorm2d
from mmsn.atomic_files import is_partial_name
from mmsn.checkpoint import (TRUSTED_CHECKPOINTS_ENV, DamagedCheckpointError,
                             UntrustedCheckpointError, load_checkpoint_file)
from mmsn.checkpoint_damage import find_checkpoint_damage

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = osp.join(ROOT, 'configs/demo/fcn_r18-sn_shapes.py')
needs_mmseg = pytest.mark.skipif(
    __import__('importlib').util.find_spec('mmseg') is None,
    reason='needs mmseg (make test installs it)')


def mmengine_checkpoint():
    """What an mmengine training checkpoint holds besides tensors: numpy values, a
    HistoryBuffer."""
    from mmengine.logging import HistoryBuffer
    torch.manual_seed(0)
    return dict(state_dict=nn.Sequential(nn.Conv2d(2, 3, 1), SwitchNorm2d(3)).state_dict(),
                meta=dict(iter=np.int64(2), loss=np.float32(0.5), dtype=np.dtype('float16')),
                message_hub=dict(log_scalars=dict(loss=HistoryBuffer([1.0, 2.0], [1, 1]))))


def release_checkpoint():
    """A bare state dict in the legacy format, as the authors' 2018 releases are."""
    torch.manual_seed(0)
    return dict(state_dict=nn.Sequential(nn.Conv2d(2, 3, 1), SwitchNorm2d(3)).state_dict())


def save(checkpoint, path, legacy=False):
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    with open(path, 'rb') as f:
        return f.read()


def write(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def assert_damaged(path):
    with pytest.raises(DamagedCheckpointError) as error:
        load_checkpoint_file(str(path))
    message = str(error.value)
    assert str(path) in message and 'damaged' in message, message
    assert 'trust' not in message.lower(), message
    return message


def same_tensors(loaded, expected):
    return (loaded['state_dict'].keys() == expected['state_dict'].keys()
            and all(torch.equal(loaded['state_dict'][k], v)
                    for k, v in expected['state_dict'].items()))


# ------------------------------------------------------------------ damaged files: loading

@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_a_truncated_checkpoint_is_damaged_at_every_offset(tmp_path, legacy):
    data = save(mmengine_checkpoint(), tmp_path / 'whole.pth', legacy)
    path = tmp_path / 'iter_2.pth'
    # every offset of the first and last 64 bytes (headers, zip directory), every 11th between
    offsets = sorted({*range(64), *range(64, len(data) - 64, 11), *range(len(data) - 64,
                                                                          len(data))})
    for offset in offsets:
        write(path, data[:offset])
        assert_damaged(path)
    write(path, data)
    assert same_tensors(load_checkpoint_file(str(path)), mmengine_checkpoint())


@pytest.mark.slow
def test_a_flipped_byte_of_a_zip_checkpoint_is_damage_or_changes_nothing(tmp_path):
    """torch.load checks no CRC-32 (a flipped tensor byte loads silently) and reads some zip
    fields Python's zipfile ignores: every flip is refused or changes no tensor."""
    torch.manual_seed(0)
    expected = dict(state_dict=nn.Conv2d(2, 3, 1).state_dict(), meta=dict(iter=np.int64(2)))
    data = save(expected, tmp_path / 'whole.pth')
    directory = data.index(b'PK\x01\x02')  # the zip directory: every byte
    path = tmp_path / 'flipped.pth'
    outcomes = dict(damaged=0, same=0)
    for offset in sorted({*range(0, directory, 5), *range(directory - 100, len(data))}):
        flipped = bytearray(data)
        flipped[offset] ^= 0xff
        write(path, flipped)
        try:
            loaded = load_checkpoint_file(str(path))
        except DamagedCheckpointError as error:
            assert 'trust' not in str(error).lower()
            outcomes['damaged'] += 1
            continue
        assert same_tensors(loaded, expected), f'byte {offset}: changed tensors loaded'
        assert loaded['meta'] == expected['meta']
        outcomes['same'] += 1
    assert outcomes['damaged'] > outcomes['same'] > 0  # (padding and timestamps are free)


def test_a_flipped_byte_of_a_legacy_checkpoint_is_never_read_as_untrusted(tmp_path):
    """The legacy format has no checksums: a flip may load as another value, but it is
    never taken for an intact file that names an untrusted global."""
    data = save(release_checkpoint(), tmp_path / 'whole.pth', legacy=True)
    path = tmp_path / 'flipped.pth'
    damaged = 0
    for offset in range(0, len(data), 3):
        flipped = bytearray(data)
        flipped[offset] ^= 0xff
        write(path, flipped)
        try:
            load_checkpoint_file(str(path))
        except DamagedCheckpointError as error:
            assert 'trust' not in str(error).lower()
            damaged += 1
    assert damaged > len(data) // 6


def test_a_garbled_global_of_a_legacy_checkpoint_is_damage_even_when_trusted(tmp_path,
                                                                              monkeypatch):
    data = save(release_checkpoint(), tmp_path / 'whole.pth', legacy=True)
    assert b'collections\nOrderedDict' in data
    path = tmp_path / 'garbled.pth'
    write(path, data.replace(b'collections\nOrderedDict', b'collections\nOrderedDicu'))
    assert 'collections.OrderedDicu' in assert_damaged(path)
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, str(path))
    assert_damaged(path)


class _RunsCodeOnLoad:
    """A pickle whose loading calls a function of the file's choosing."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))  # creates the marker file when unpickled


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_a_damaged_file_is_refused_as_damaged_even_when_trusted_and_runs_nothing(
        tmp_path, monkeypatch, legacy):
    marker = tmp_path / 'ran'
    checkpoint = dict(release_checkpoint(), meta=_RunsCodeOnLoad(marker))
    data = save(checkpoint, tmp_path / 'whole.pth', legacy)
    path = tmp_path / 'evil.pth'
    monkeypatch.setenv(TRUSTED_CHECKPOINTS_ENV, str(path))
    # cut in the middle, and (legacy) right after the global that runs code
    cuts = [len(data) // 2] + ([data.index(b'\nopen\n') + 6] if legacy else [])
    for cut in cuts:
        write(path, data[:cut])
        assert_damaged(path)
        assert not marker.exists()
    # intact: refused as untrusted until trusted, as before
    write(path, data)
    monkeypatch.delenv(TRUSTED_CHECKPOINTS_ENV)
    with pytest.raises(UntrustedCheckpointError, match='io.open'):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_checkpoints_saved_without_checksums_load_and_their_damage_is_found(tmp_path):
    expected = mmengine_checkpoint()
    torch.serialization.set_crc32_options(False)
    try:
        data = save(expected, tmp_path / 'whole.pth')
    finally:
        torch.serialization.set_crc32_options(True)
    assert same_tensors(load_checkpoint_file(str(tmp_path / 'whole.pth')), expected)
    write(tmp_path / 'cut.pth', data[:len(data) - 30])
    assert_damaged(tmp_path / 'cut.pth')


def test_files_that_are_no_checkpoint_and_empty_files(tmp_path):
    (tmp_path / 'notes.pth').write_text('epoch,top1\n100,77.49\n')
    assert 'is not a PyTorch checkpoint' in assert_damaged(tmp_path / 'notes.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    assert 'empty' in assert_damaged(tmp_path / 'empty.pth')
    write(tmp_path / 'tensor.pth', pickle.dumps([1, 2]))  # a pickle, not torch's format
    assert 'is not a PyTorch checkpoint' in assert_damaged(tmp_path / 'tensor.pth')


def test_the_message_points_to_the_other_checkpoints_of_the_run(tmp_path):
    data = save(mmengine_checkpoint(), tmp_path / 'iter_1.pth')
    write(tmp_path / 'iter_2.pth', data[:100])
    message = assert_damaged(tmp_path / 'iter_2.pth')
    assert 'truncated' in message and 'iter_1.pth' in message
    assert find_checkpoint_damage(str(tmp_path / 'iter_1.pth')) is None


def test_mmengine_loading_fails_before_any_weight_is_copied(tmp_path):
    from mmengine.runner import load_checkpoint
    source = nn.Conv2d(2, 3, 1)
    data = save(dict(state_dict=source.state_dict()), tmp_path / 'whole.pth')
    write(tmp_path / 'cut.pth', data[:len(data) - 10])
    target = nn.Conv2d(2, 3, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DamagedCheckpointError, match='cut.pth is a damaged checkpoint'):
        load_checkpoint(target, str(tmp_path / 'cut.pth'))  # mmsn's loader, registered
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_the_tools_report_a_damaged_checkpoint(tmp_path, capsys):
    import importlib.util
    data = save(dict(state_dict=SwitchNorm2d(4).state_dict()), tmp_path / 'whole.pth')
    path = tmp_path / 'cut.pth'
    write(path, data[:len(data) // 2])
    for tool in ('analysis_tools/harden_ratios.py', 'analysis_tools/plot_ratios.py'):
        spec = importlib.util.spec_from_file_location('tool', osp.join(ROOT, 'tools', tool))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        argv = [str(path), str(tmp_path / 'out.pth')] if 'harden' in tool else [
            str(path), '--out-dir', str(tmp_path / 'plots')]
        assert module.main(argv) == 1
        err = capsys.readouterr().err
        assert f'{path} is a damaged checkpoint' in err and 'trust' not in err.lower()
    assert not (tmp_path / 'out.pth').exists()
    # the converter, as a command
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools/model_converters/sn2mm.py'),
                          str(path), str(tmp_path / 'converted.pth')], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 1
    assert f'{path} is a damaged checkpoint' in run.stderr, run.stderr
    assert 'trust' not in (run.stdout + run.stderr).lower()
    assert not (tmp_path / 'converted.pth').exists()


# ------------------------------------------------------------------ a demo run to save from

def demo_config(work_dir, data_root, **checkpoint_options):
    """The demo FCN config on the generated shapes, 2 images a batch, no validation,
    checkpoints every iteration through AtomicCheckpointHook, keeping one."""
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO)
    cfg.work_dir = str(work_dir)
    cfg.visualizer.name = f'visualizer_{osp.basename(str(work_dir))}'
    for loader in ('train_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = f'{data_root}/'
        cfg[loader].batch_size = 2
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='AtomicCheckpointHook', interval=1,
                                        by_epoch=False, max_keep_ckpts=1, **checkpoint_options)
    return cfg


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    pytest.importorskip('mmseg')
    from mmsn.demo.shapes import make_shapes_dataset
    root = str(tmp_path_factory.mktemp('safety') / 'shapes')
    make_shapes_dataset(root, num_train=4, num_val=2)
    return root


@pytest.fixture(scope='module')
def saved_once(tmp_path_factory, shapes):
    """A demo Runner trained one iteration (iter_1.pth saved), and a copy of its work dir's
    checkpoint files as they were then."""
    from mmengine.runner import Runner
    work_dir = tmp_path_factory.mktemp('work')
    runner = Runner.from_cfg(demo_config(work_dir, shapes))
    runner.train()
    pristine = tmp_path_factory.mktemp('pristine')
    for name in ('iter_1.pth', 'last_checkpoint'):
        shutil.copy(work_dir / name, pristine / name)
    return runner, pristine


def back_to_iteration_1(runner, pristine):
    """The work dir and the runner as they were after the save at iteration 1."""
    for entry in os.scandir(runner.work_dir):
        if entry.is_file() and (entry.name.endswith('.pth') or is_partial_name(entry.name)
                                or entry.name == 'last_checkpoint'):
            os.remove(entry.path)
    for name in ('iter_1.pth', 'last_checkpoint'):
        shutil.copy(pristine / name, osp.join(runner.work_dir, name))
    for key in ('best_score', 'best_ckpt'):  # resume merges into what the hub holds
        runner.message_hub.pop_info(key, None)
    runner.resume(osp.join(runner.work_dir, 'iter_1.pth'))
    assert runner.iter == 1


class Killed(BaseException):
    """Stands in for SIGKILL: raised at one step of a save, nothing after it in the save
    runs (BaseException: no `except Exception` of mmengine's catches it)."""


class _DiesMidWrite:
    """A file whose first write stores half the bytes, then the process 'dies'."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        raise Killed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def kill(monkeypatch, step):
    """Makes the process 'die' at ``step`` of the next save."""
    import builtins

    import mmsn.atomic_files
    from mmsn.mm.checkpoint_hook import AtomicLocalBackend
    real_open, real_replace = builtins.open, os.replace

    def target(path):
        return 'last_checkpoint' if 'last_checkpoint' in osp.basename(path) else 'checkpoint'

    def open_(path, mode='r', *args, **kwargs):
        if step == f'{target(path)} not begun':
            raise Killed
        file = real_open(path, mode, *args, **kwargs)
        return _DiesMidWrite(file) if step == f'{target(path)} half written' else file

    def replace(src, dst):
        if step == f'{target(dst)} written, not renamed':
            raise Killed
        real_replace(src, dst)

    def remove(self, filepath):
        raise Killed

    monkeypatch.setattr(mmsn.atomic_files, 'open', open_, raising=False)
    monkeypatch.setattr(os, 'replace', replace)
    if step == 'retired checkpoint not removed':
        monkeypatch.setattr(AtomicLocalBackend, 'remove', remove)


#: step of the save at iteration 2 -> the iteration last_checkpoint must then name
STEPS = {
    'checkpoint not begun': 1,
    'checkpoint half written': 1,
    'checkpoint written, not renamed': 1,
    'last_checkpoint not begun': 1,
    'last_checkpoint half written': 1,
    'last_checkpoint written, not renamed': 1,
    'retired checkpoint not removed': 2,
    'nothing (the save completes)': 2,
}


@pytest.mark.slow
@needs_mmseg
@pytest.mark.parametrize('step', list(STEPS))
def test_a_kill_at_any_step_of_a_save_leaves_a_checkpoint_to_resume_from(
        saved_once, monkeypatch, step):
    from mmsn.mm.checkpoint_hook import AtomicCheckpointHook
    runner, pristine = saved_once
    back_to_iteration_1(runner, pristine)
    hook = AtomicCheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=1)
    hook.before_train(runner)
    with monkeypatch.context() as patched:
        kill(patched, step)
        try:
            hook._save_checkpoint(runner)  # the save after iteration 2 (runner.iter + 1)
        except Killed:
            pass
    with open(osp.join(runner.work_dir, 'last_checkpoint')) as f:
        named = f.read()
    assert named == osp.join(runner.work_dir, f'iter_{STEPS[step]}.pth')
    # every checkpoint under its final name is complete, the named one included
    for entry in os.scandir(runner.work_dir):
        if entry.name.endswith('.pth'):
            assert find_checkpoint_damage(entry.path) is None, entry.name
    checkpoint = load_checkpoint_file(named)
    runner.resume(named)
    assert runner.iter == STEPS[step]
    model = runner.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in checkpoint['state_dict'].items())
    if step.startswith('nothing'):  # max_keep_ckpts=1: the retired one is gone, after
        assert not osp.exists(osp.join(runner.work_dir, 'iter_1.pth'))


@pytest.mark.slow
@needs_mmseg
def test_the_previous_best_checkpoint_is_removed_only_after_the_new_one_is_complete(
        saved_once, monkeypatch):
    from mmsn.mm.checkpoint_hook import AtomicCheckpointHook
    runner, pristine = saved_once
    first = osp.join(runner.work_dir, 'best_mIoU_iter_1.pth')
    second = osp.join(runner.work_dir, 'best_mIoU_iter_2.pth')
    for killed in (True, False):
        back_to_iteration_1(runner, pristine)
        hook = AtomicCheckpointHook(interval=1, by_epoch=False, save_best='mIoU',
                                    rule='greater')
        hook.before_train(runner)
        hook._save_best_checkpoint(runner, dict(mIoU=10.0))
        assert osp.isfile(first)
        runner.train_loop._iter = 2
        with monkeypatch.context() as patched:
            if killed:
                kill(patched, 'checkpoint half written')
            try:
                hook._save_best_checkpoint(runner, dict(mIoU=20.0))
            except Killed:
                pass
        if killed:  # the new best died while written: the previous one stays
            assert load_checkpoint_file(first)['meta']['iter'] == 1
            assert not osp.exists(second)
        else:
            assert not osp.exists(first)
            assert load_checkpoint_file(second)['meta']['iter'] == 2


@needs_mmseg
def test_use_atomic_checkpoints_takes_the_place_of_mmengines_checkpoint_hook_only():
    from mmengine.config import Config
    from mmengine.hooks import CheckpointHook
    from mmengine.registry import HOOKS

    from mmsn.mm.checkpoint_hook import use_atomic_checkpoints

    class OwnCheckpointHook(CheckpointHook):
        pass

    HOOKS.register_module(module=OwnCheckpointHook, force=True)
    for given, expected in [('CheckpointHook', 'AtomicCheckpointHook'),
                            ('mmengine.CheckpointHook', 'AtomicCheckpointHook'),
                            ('AtomicCheckpointHook', 'AtomicCheckpointHook'),
                            ('OwnCheckpointHook', 'OwnCheckpointHook')]:
        cfg = Config(dict(default_scope='mmseg', default_hooks=dict(
            checkpoint=dict(type=given, interval=5, max_keep_ckpts=2))))
        assert use_atomic_checkpoints(cfg) == (expected == 'AtomicCheckpointHook')
        assert cfg.default_hooks.checkpoint == dict(type=expected, interval=5,
                                                    max_keep_ckpts=2)
    cfg = Config(dict(default_hooks=dict(checkpoint=None)))  # turned off: stays off
    assert not use_atomic_checkpoints(cfg) and cfg.default_hooks.checkpoint is None
    cfg = Config(dict(default_scope='mmseg'))  # the runner's default, every epoch
    assert use_atomic_checkpoints(cfg)
    assert cfg.default_hooks.checkpoint == dict(type='AtomicCheckpointHook', interval=1)


# ------------------------------------------------------------------ the real tools

def tool_env(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    env.pop(TRUSTED_CHECKPOINTS_ENV, None)
    return env


BALLAST = '''
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class BallastHook(Hook):
    """Makes every checkpoint {mib} MiB larger, so that its save takes a while."""

    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint['ballast'] = torch.ones({mib} << 18)
'''


@pytest.mark.slow
@needs_mmseg
def test_sigkill_during_a_save_leaves_a_checkpoint_that_training_resumes_from(
        tmp_path, shapes):
    """tools/train.py, killed with SIGKILL while it writes the second of two large
    checkpoints (max_keep_ckpts=1: mmengine 0.10 has removed the first by then): the first
    is still there, named by last_checkpoint, and --resume continues from it."""
    (tmp_path / 'ballast.py').write_text(BALLAST.format(mib=16))
    config = tmp_path / 'ballasted.py'
    config.write_text(
        f"_base_ = '{DEMO}'\n"
        "custom_imports = dict(imports=['mmsn', 'ballast'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='BallastHook')]\n"
        "val_dataloader = val_cfg = val_evaluator = None\n"
        "param_scheduler = []\n"
        "train_cfg = dict(type='IterBasedTrainLoop', max_iters=2)\n"
        "default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook', interval=1, "
        "by_epoch=False, max_keep_ckpts=1))\n")
    work_dir = tmp_path / 'work'
    command = [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir),
               '--cfg-options', f'train_dataloader.dataset.data_root={shapes}/',
               'train_dataloader.batch_size=2']
    log = open(tmp_path / 'killed.log', 'w')
    process = subprocess.Popen(command, cwd=ROOT, env=tool_env(tmp_path), stdout=log,
                               stderr=subprocess.STDOUT)
    partial = None
    deadline = time.time() + 300
    while partial is None and process.poll() is None and time.time() < deadline:
        if work_dir.is_dir():
            partial = next((e.path for e in os.scandir(work_dir)
                            if e.name.startswith('iter_2.pth.') and is_partial_name(e.name)),
                           None)
        if partial is None:
            time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    assert partial is not None, (tmp_path / 'killed.log').read_text()[-3000:]
    with open(work_dir / 'last_checkpoint') as f:
        named = f.read()
    # iter_1.pth, unless the 16 MiB write and its fsync ended within the poll's millisecond
    interrupted = named == str(work_dir / 'iter_1.pth')
    assert interrupted or named == str(work_dir / 'iter_2.pth')
    assert load_checkpoint_file(named)['ballast'].numel() == 16 << 18  # complete
    for entry in os.scandir(work_dir):  # no truncated file under a final name
        if entry.name.endswith('.pth'):
            assert find_checkpoint_damage(entry.path) is None, entry.name
    # resumed through tools/train.py --resume (the work dir's last_checkpoint)
    run = subprocess.run(command + ['--resume'], cwd=ROOT, env=tool_env(tmp_path),
                         capture_output=True, text=True)
    resumed = run.stdout + run.stderr
    assert run.returncode == 0, resumed[-3000:]
    assert f'Auto resumed from the latest checkpoint {named}' in resumed
    with open(work_dir / 'last_checkpoint') as f:
        assert f.read() == str(work_dir / 'iter_2.pth')
    assert load_checkpoint_file(str(work_dir / 'iter_2.pth'))['meta']['iter'] == 2
    if interrupted:
        assert 'resumed epoch: 0, iter: 1' in resumed
        assert 'left by an interrupted save' in resumed  # the partial file, removed
        assert sorted(e.name for e in os.scandir(work_dir)
                      if e.name.endswith(('.pth', '.partial'))) == ['iter_2.pth']


@pytest.mark.slow
@needs_mmseg
@pytest.mark.parametrize('tool', ['test', 'train --resume'])
def test_tools_report_a_truncated_checkpoint_by_name(tmp_path, shapes, tool):
    torch.manual_seed(0)
    data = save(dict(state_dict=nn.Conv2d(2, 3, 1).state_dict()), tmp_path / 'whole.pth')
    checkpoint = tmp_path / 'iter_4.pth'
    write(checkpoint, data[:len(data) // 2])
    options = ['--work-dir', str(tmp_path / 'work'), '--cfg-options'] + [
        f'{loader}.dataset.data_root={shapes}/'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    if tool == 'test':
        command = ['tools/test.py', DEMO, str(checkpoint)] + options
    else:
        command = ['tools/train.py', DEMO, '--resume', str(checkpoint)] + options
    run = subprocess.run([sys.executable] + command, cwd=ROOT, env=tool_env(tmp_path),
                         capture_output=True, text=True)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert f'{checkpoint} is a damaged checkpoint: truncated' in output, output[-3000:]
    assert 'whole.pth' in output  # another checkpoint of the directory, offered
    assert 'trust' not in output.lower()


@pytest.mark.slow
@needs_mmseg
def test_tools_train_py_saves_through_atomic_checkpoint_hook(tmp_path):
    import argparse

    from mmengine.config import Config

    from mmsn.mm.launch import prepare_config
    args = argparse.Namespace(config=DEMO, cfg_options={}, launcher='none',
                              work_dir=str(tmp_path), resume=None, amp=False,
                              trust_checkpoint=False, checkpoint='iter_4.pth')
    cfg = prepare_config(Config.fromfile(DEMO), args, mode='train')
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    cfg = prepare_config(Config.fromfile(DEMO), args, mode='test')
    assert cfg.default_hooks.checkpoint.type == 'CheckpointHook'  # testing saves nothing
