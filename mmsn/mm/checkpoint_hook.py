"""``AtomicCheckpointHook``: mmengine's ``CheckpointHook`` with saves that a kill at any
moment cannot spoil.

mmengine 0.10's ``CheckpointHook`` removes the checkpoint that ``max_keep_ckpts`` retires
*before* it writes the new one, writes the new one in place (its local file backend opens
the target with ``'wb'``), and rewrites ``last_checkpoint`` in place: a kill during a save
leaves a truncated ``iter_N.pth``, and with ``max_keep_ckpts`` nothing to resume from. This
hook saves in the order that always leaves a complete checkpoint named by
``last_checkpoint``:

1. the checkpoint is written to a temporary name in the same directory, fsynced, and renamed
   to its final name (:func:`mmsn.atomic_files.atomic_write`, through the file backend
   :class:`AtomicLocalBackend`, which mmengine's ``save_checkpoint`` is handed by name);
2. ``last_checkpoint`` is rewritten the same way;
3. only then are retired checkpoints removed (``max_keep_ckpts``; a previous best checkpoint
   of ``save_best`` likewise waits until the new best one is complete).

Temporary files that a kill left behind are removed when the next training starts.

``tools/train.py`` puts this hook in place of mmengine's ``CheckpointHook``
(:func:`use_atomic_checkpoints`); with mmdet's or mmseg's own tools, a config asks for it
with ``default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook', ...))``. Other
runs are not changed. Checkpoints saved through a non-local backend (``backend_args``,
``file_client_args``, or a remote ``out_dir``) are saved as ``CheckpointHook`` saves them.
"""
import os
import os.path as osp
from typing import List, Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, get_file_backend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from ..atomic_files import atomic_write, is_partial_name

#: The name :class:`AtomicLocalBackend` is registered under in mmengine's file backends.
ATOMIC_BACKEND = 'mmsn_atomic_local'


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put`` and ``put_text`` write a file atomically
    (:func:`mmsn.atomic_files.atomic_write`): readers and kills see the old file or the
    complete new one, never a part."""

    def put(self, obj: bytes, filepath) -> None:
        os.makedirs(osp.dirname(osp.abspath(filepath)), exist_ok=True)
        with atomic_write(str(filepath), 'wb') as file:
            file.write(obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        os.makedirs(osp.dirname(osp.abspath(filepath)), exist_ok=True)
        with atomic_write(str(filepath), 'w', encoding=encoding) as file:
            file.write(obj)


class _RemovalsDeferred:
    """The hook's file backend while ``CheckpointHook`` saves a best checkpoint: the removal
    of the previous best one is noted, not done, until the new one is complete."""

    def __init__(self, backend):
        self.backend = backend
        self.removed: List[str] = []

    def remove(self, filepath) -> None:
        self.removed.append(filepath)

    def rmtree(self, dir_path) -> None:
        self.removed.append(dir_path)

    def __getattr__(self, name):
        return getattr(self.backend, name)


class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (same arguments) whose saves leave, at every moment, a complete
    checkpoint named by ``last_checkpoint``: written under a temporary name and renamed,
    then ``last_checkpoint`` replaced the same way, then retired checkpoints removed.

    Saves through a file backend other than the local one are left to ``CheckpointHook``.
    """

    atomic = False  # decided in before_train, where the output directory is known

    def before_train(self, runner) -> None:
        out_dir = self.out_dir if self.out_dir is not None else runner.work_dir
        # Only where mmengine would write plain local files: a remote out_dir or a backend
        # the config chose keeps CheckpointHook's own saving. (AtomicLocalBackend: this hook
        # chose it in an earlier training of the same runner.)
        backend = get_file_backend(out_dir, backend_args=self.backend_args)
        self.atomic = self.file_client_args is None and type(backend) in (LocalBackend,
                                                                          AtomicLocalBackend)
        if self.atomic:
            self.backend_args = dict(backend=ATOMIC_BACKEND)
        super().before_train(runner)
        if self.atomic and is_main_process():
            self._remove_partials(runner, {self.out_dir, runner.work_dir})

    @staticmethod
    def _remove_partials(runner, directories) -> None:
        """Removes temporary files a killed save left behind."""
        for directory in directories:
            if not osp.isdir(directory):
                continue
            for entry in os.scandir(directory):
                if is_partial_name(entry.name) and entry.is_file():
                    os.remove(entry.path)
                    runner.logger.info(f'Removed {entry.path}, left by an interrupted save')

    def _remove(self, path: str) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are directories
            self.file_backend.rmtree(path)

    def _retire(self, runner, step: int) -> Optional[int]:
        """``CheckpointHook``'s bookkeeping of ``max_keep_ckpts`` for a save at ``step``;
        returns the step whose checkpoint is to go once the new one is complete."""
        retired = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids
                                            and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                retired = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            # before the save, as CheckpointHook does: the checkpoint holds the ids it keeps
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        return retired

    def _save_checkpoint_with_step(self, runner, step, meta):
        if not self.atomic:
            return super()._save_checkpoint_with_step(runner, step, meta)
        retired = self._retire(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, filename, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args)
        if not is_main_process():  # only the main process writes files
            return
        with atomic_write(osp.join(runner.work_dir, 'last_checkpoint'), 'w') as file:
            file.write(self.last_ckpt)
        if retired is not None:
            self._remove(self.file_backend.join_path(self.out_dir,
                                                     self.filename_tmpl.format(retired)))

    def _save_best_checkpoint(self, runner, metrics) -> None:
        if not self.atomic:
            return super()._save_best_checkpoint(runner, metrics)
        backend = self.file_backend
        self.file_backend = deferred = _RemovalsDeferred(backend)
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        # Reached only once the new best checkpoints are complete (an error above keeps the
        # previous ones); a previous best of the same name was replaced, not to be removed.
        current = {getattr(self, 'best_ckpt_path', None),
                   *(getattr(self, 'best_ckpt_path_dict', None) or {}).values()}
        for path in deferred.removed:
            if path not in current:
                self._remove(path)


def register_checkpoint_hook() -> None:
    """Registers :class:`AtomicCheckpointHook` in mmengine's root ``HOOKS`` and
    :class:`AtomicLocalBackend` among mmengine's file backends as ``'mmsn_atomic_local'``
    (new names only; an existing different entry is an error; idempotent)."""
    from mmengine.fileio.io import backends
    if backends.get(ATOMIC_BACKEND) is not AtomicLocalBackend:
        register_backend(ATOMIC_BACKEND, AtomicLocalBackend)
    if HOOKS.module_dict.get(AtomicCheckpointHook.__name__) is not AtomicCheckpointHook:
        HOOKS.register_module(module=AtomicCheckpointHook)


def use_atomic_checkpoints(cfg) -> bool:
    """Makes a training config save its checkpoints with :class:`AtomicCheckpointHook`:
    ``default_hooks.checkpoint`` becomes one when it is mmengine's ``CheckpointHook``, or when
    it is absent (the runner's default, a ``CheckpointHook`` every epoch). A checkpoint hook
    turned off (``None``) or of another class is left as it is.

    Args:
        cfg (mmengine.Config): a training config; changed in place.

    Returns:
        bool: whether the config now saves with :class:`AtomicCheckpointHook`.
    """
    from mmengine.config import ConfigDict
    register_checkpoint_hook()
    if cfg.get('default_hooks') is None:
        cfg.default_hooks = ConfigDict()
    default_hooks = cfg.default_hooks  # (assigning stores a copy)
    if 'checkpoint' not in default_hooks:
        default_hooks.checkpoint = ConfigDict(type=AtomicCheckpointHook.__name__, interval=1)
        return True
    hook = default_hooks.checkpoint
    if not hasattr(hook, 'get'):
        return isinstance(hook, AtomicCheckpointHook)  # None, or a hook object
    kind = hook.get('type')
    if isinstance(kind, str):
        # resolved as the runner will: in the config's scope, falling back to mmengine's
        with HOOKS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
            kind = registry.get(kind)
    if kind is AtomicCheckpointHook:
        return True
    if kind is not CheckpointHook:
        return False
    hook.type = AtomicCheckpointHook.__name__
    return True


__all__ = ['ATOMIC_BACKEND', 'AtomicCheckpointHook', 'AtomicLocalBackend',
           'register_checkpoint_hook', 'use_atomic_checkpoints']
