"""What tools/train.py and tools/test.py share: arguments, config, the run.

Works for mmdet and mmseg configs alike (the config's ``default_scope`` decides), on GPUs with
NCCL and on the CPU with gloo. mmengine 0.10.7's ``pytorch`` launcher calls
``torch.cuda.set_device`` unconditionally and wraps the model with ``device_ids=[LOCAL_RANK]``;
both fail without CUDA, so on the CPU :func:`prepare_config` creates the process group
(:func:`~mmsn.mm.process_group.init_cpu_distributed`; the Runner then skips its own
``init_dist``) and DDP is built without device ids.
"""
import argparse
import copy
import os
import os.path as osp
from typing import Optional

import torch

from ..checkpoint import add_trust_option, trust_checkpoint
from .process_group import (dist_timeout, finish_distributed, init_cpu_distributed,
                            reporting_unresponsive_processes)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='the directory to save logs and models')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config settings, key=value pairs (xxx=yyy)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    add_trust_option(parser)
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


class DictAction(argparse.Action):
    """mmengine's DictAction, imported lazily so ``--help`` works before installation."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction
        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def _rescope_inherited(node, scope: str) -> None:
    """Dicts a config took from mmsn's shipped ones (``_base_ = 'mmsn::...'``) carry
    ``_scope_='mmsn'`` (mmengine marks what it takes from a package); mmsn has no registries
    of its own (its configs are mmdet or mmseg configs), so they take ``scope``."""
    if isinstance(node, dict):
        if node.get('_scope_') == 'mmsn':
            node['_scope_'] = scope
        for value in node.values():
            _rescope_inherited(value, scope)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _rescope_inherited(value, scope)


def apply_config_options(cfg, cfg_options: Optional[dict] = None) -> None:
    """What every tool does to a loaded config first: the dicts it inherits from mmsn's
    shipped configs take its scope, then ``--cfg-options`` are merged."""
    if cfg.get('default_scope'):
        _rescope_inherited(cfg._cfg_dict, cfg.default_scope)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)


def prepare_config(cfg, args, mode: str):
    """Applies the command line to ``cfg``: work dir, options, launcher, resume, AMP, devices."""
    from mmengine.config import ConfigDict
    apply_config_options(cfg, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if mode == 'train':
        from .checkpoint_hook import use_atomic_checkpoints
        use_atomic_checkpoints(cfg)  # checkpoints and last_checkpoint that a kill cannot spoil
        if getattr(args, 'amp', False):
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        if getattr(args, 'resume', None) == 'auto':
            cfg.resume, cfg.load_from = True, None
        elif getattr(args, 'resume', None) is not None:
            cfg.resume, cfg.load_from = True, args.resume
    else:
        cfg.load_from = args.checkpoint
    if getattr(args, 'trust_checkpoint', False):
        trusted = cfg.get('load_from')
        if trusted is None and cfg.get('resume'):
            from mmengine.runner import find_latest_checkpoint
            trusted = find_latest_checkpoint(cfg.work_dir)
        if trusted is None:
            raise ValueError('--trust-checkpoint: expected a checkpoint to trust (--resume '
                             'CKPT, a work dir with a last_checkpoint, or load_from), got none')
        trust_checkpoint(trusted)
    if args.launcher != 'none':
        cfg.setdefault('env_cfg', ConfigDict())
        cfg.env_cfg.setdefault('dist_cfg', ConfigDict())
        if torch.cuda.is_available():
            cfg.env_cfg.dist_cfg.backend = 'nccl'
        else:
            if args.launcher != 'pytorch':
                raise ValueError(f'--launcher: only "pytorch" (torchrun) runs without CUDA, '
                                 f'got {args.launcher!r}')
            cfg.env_cfg.dist_cfg.backend = 'gloo'
            wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(type='MMDistributedDataParallel')
            wrapper.device_ids = None  # explicit: the runner's default is [LOCAL_RANK]
            wrapper.setdefault('broadcast_buffers', False)
            cfg.model_wrapper_cfg = wrapper
            init_cpu_distributed(dist_timeout(cfg))
    return cfg


def norm_arguments(parser: argparse.ArgumentParser) -> None:
    """tools/train.py's norm switch and batch-size options (``mmsn.mm.norm_switch``)."""
    from .norm_switch import NORM_CHOICES
    group = parser.add_argument_group('norm switch (any mmdet/mmseg config)')
    group.add_argument('--norm', choices=NORM_CHOICES,
                       help='rewrite every BatchNorm of the model to this norm (SW/SyncSW: '
                       'the ResNet backbone at --sw-layers)')
    group.add_argument('--norm-heads', action='store_true',
                       help='also give heads and necks without a norm one')
    group.add_argument('--sw-layers', default='imagenet', choices=['imagenet', 'segmentation'],
                       help='SW placement for --norm SW/SyncSW')
    pretrained = group.add_mutually_exclusive_group()
    pretrained.add_argument('--pretrained', metavar='FILE',
                            help='a converted checkpoint for the switched backbone')
    pretrained.add_argument('--no-pretrained', action='store_true',
                            help='train the switched backbone from scratch')
    group.add_argument('--batch-size', type=int, metavar='N',
                       help='images per process; the learning rate scales linearly from the '
                       "config's total batch size")


#: where each launcher puts the process count and this process's rank (before mmengine's
#: init_dist, which sets WORLD_SIZE and RANK for slurm and mpi itself, has run)
_LAUNCHER_ENV = {'pytorch': ('WORLD_SIZE', 'RANK'), 'slurm': ('SLURM_NTASKS', 'SLURM_PROCID'),
                 'mpi': ('OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK')}


def _world_size(args) -> int:
    if args.launcher == 'none':
        return 1
    return int(os.environ.get(_LAUNCHER_ENV[args.launcher][0], '1'))


def _is_first_process() -> bool:
    return all(os.environ.get(rank, '0') == '0' for _, rank in _LAUNCHER_ENV.values())


def _log(line: str) -> None:
    if _is_first_process():
        print(line, flush=True)


def apply_norm_options(cfg, args):
    """Applies ``--norm`` and ``--batch-size``; returns the model config as it was (for
    :func:`report_switched_model`), or None without ``--norm``."""
    from .batch_size import scale_batch_size
    from .norm_switch import switch_config_norm
    original = None
    given = [flag for flag, value in (('--norm-heads', args.norm_heads),
                                      ('--pretrained', args.pretrained),
                                      ('--no-pretrained', args.no_pretrained)) if value]
    if given and not args.norm:
        raise ValueError(f'{", ".join(given)}: expected with --norm, got no --norm')
    if getattr(args, 'norm', None):
        original = copy.deepcopy(cfg.model)
        pretrained = 'none' if args.no_pretrained else (args.pretrained or 'auto')
        report = switch_config_norm(cfg, args.norm, heads=args.norm_heads,
                                    pretrained=pretrained, sw_layers=args.sw_layers,
                                    work_dir=cfg.work_dir)
        for line in report.lines():
            _log(line)
    if getattr(args, 'batch_size', None):
        _log(scale_batch_size(cfg, args.batch_size, _world_size(args), args.config))
    return original


def report_switched_model(runner, original, norm: str) -> None:
    """Checks the built model and prints its changed norm modules, one line per path."""
    from mmengine.registry import MODELS
    from .norm_check import check_switched, module_changes
    model = getattr(runner.model, 'module', runner.model)
    check_switched(model, norm)
    if not _is_first_process():
        return  # (one process prints)
    with MODELS.switch_scope_and_registry(runner.cfg.get('default_scope')) as registry:
        before = registry.build(original)
    lines = module_changes(before, model)
    _log(f'--norm {norm}: {len(lines)} norm modules changed')
    for line in lines:
        _log(f'  {line}')


def run(args, mode: str) -> int:
    """What tools/train.py and tools/test.py do: build the Runner, train or test, and end
    the distributed run in order (see :func:`~mmsn.mm.process_group.finish_distributed`). Returns the exit status."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))  # (launchers that pass --local-rank)
    with reporting_unresponsive_processes():
        runner = build_runner(args, mode=mode)
        runner.train() if mode == 'train' else runner.test()
    del runner  # (its DistributedDataParallel holds the process group: see finish_distributed)
    finish_distributed()
    return 0


def build_runner(args, mode: str):
    """Loads the config, applies the arguments and builds the (mmdet or mmseg) Runner."""
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    cfg = prepare_config(Config.fromfile(args.config), args, mode)
    original = apply_norm_options(cfg, args) if mode == 'train' else None
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    if original is not None:
        report_switched_model(runner, original, args.norm)
    return runner
