"""``--batch-size``: a per-process batch size, with the learning rate scaled linearly from
the config's own total batch size."""
import os.path as osp
import re
from typing import Tuple

_PROCESSES_IN_NAME = re.compile(r'_(\d+)xb(\d+)[-_]')


def base_batch_size(cfg, config_name: str = '') -> Tuple[int, str]:
    """The config's own total batch size, and where it came from:
    ``auto_scale_lr.base_batch_size``, else its dataloader batch size times the process
    count its name states (e.g. ``4xb4``)."""
    base = (cfg.get('auto_scale_lr') or {}).get('base_batch_size')
    if base is not None:
        return base, 'auto_scale_lr.base_batch_size'
    per_process = cfg.train_dataloader.batch_size
    match = _PROCESSES_IN_NAME.search(osp.basename(config_name) + '_')
    if match is None:
        raise ValueError(f'--batch-size: the config has no auto_scale_lr.base_batch_size and '
                         f'its name {osp.basename(config_name)!r} states no process count '
                         '(e.g. 4xb4): its total batch size is unknown')
    return (int(match.group(1)) * per_process,
            f'{match.group(1)} processes (name) x {per_process}')


def scale_batch_size(cfg, batch_size: int, world_size: int,
                     config_name: str = '') -> str:
    """Sets the per-process training batch size and scales the learning rate linearly from
    the config's own total batch size (:func:`base_batch_size`).

    Returns:
        str: what it did, for the log.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size: expected a positive int, got {batch_size!r}')
    base, how = base_batch_size(cfg, config_name)
    total = batch_size * world_size
    optimizer = cfg.optim_wrapper.optimizer
    old_lr = optimizer.lr
    optimizer.lr = old_lr * total / base
    cfg.train_dataloader.batch_size = batch_size
    if cfg.get('auto_scale_lr') is not None:
        cfg.auto_scale_lr.enable = False  # scaled here, once
    return (f'--batch-size {batch_size}: {world_size} x {batch_size} = {total} images per '
            f'step (config: {base}, from {how}); lr {old_lr:g} -> {optimizer.lr:g}')
