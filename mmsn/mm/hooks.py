"""mmengine hooks: ratio logging, batch-average inference statistics, the SSN radius."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..analysis import model_ratios, ratio_scalars
from ..batch_average import batch_average_statistics
from ..ops.configs import check_positive_int


class SwitchableRatioHook(Hook):
    """Sends the softmax ratios of every SN/SW layer to the visualizer backends every
    ``interval`` training iterations (scalars ``ratios/<layer>/<mean|var>_<statistic>``),
    and keeps the final ratios in the checkpoint's ``meta['switchable_ratios']``.

    Args:
        interval (int): iterations between two records. Defaults to 50.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50):
        self.interval = check_positive_int('interval', interval)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval) or self.is_last_train_iter(runner):
            runner.visualizer.add_scalars(ratio_scalars(model_ratios(runner.model)),
                                          step=runner.iter + 1)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault('meta', {})['switchable_ratios'] = model_ratios(runner.model)


class BatchAverageHook(Hook):
    """Before each validation (and test), replaces the running statistics of every SN/SW
    layer by the average batch statistics of ``num_batches`` training mini-batches fed
    through the frozen model (SN paper Sec. 3.2; the paper uses 200). In distributed runs
    the averages are averaged over all processes.

    Args:
        num_batches (int): mini-batches per process. Defaults to 200.
        before_test (bool): also before testing. Defaults to True.
    """

    priority = 'HIGH'

    def __init__(self, num_batches: int = 200, before_test: bool = True):
        self.num_batches = check_positive_int('num_batches', num_batches)
        self.before_test_run = before_test

    def average(self, runner) -> None:
        model = runner.model
        saved = random_state()  # the training's draws go on as if no batch had been read
        used = batch_average_statistics(model, runner.train_dataloader, model.val_step,
                                        self.num_batches)
        set_random_state(saved)
        runner.logger.info(f'BatchAverageHook: running statistics of the SN/SW layers are '
                           f'the average over {used} training batches per process')

    def before_val(self, runner) -> None:
        self.average(runner)

    def before_test(self, runner) -> None:
        if self.before_test_run:
            self.average(runner)


class SSNRadiusHook(Hook):
    """Grows the sparsestmax radius of every SSN layer linearly from 0 at ``begin`` to
    ``max_radius`` at ``end`` (iterations; default: the whole training) and freezes the
    ratios that have become one-hot, as the SSN paper trains.

    Args:
        max_radius (float): final radius; 1 (or more than sqrt(2/3)) makes every ratio one-hot.
        begin (int): iteration where the radius starts growing. Defaults to 0.
        end (int, optional): iteration where it reaches ``max_radius``. Defaults to max_iters.
    """

    priority = 'NORMAL'

    def __init__(self, max_radius: float = 1.0, begin: int = 0, end: Optional[int] = None):
        if not 0 < max_radius:
            raise ValueError(f'max_radius: expected a positive float, got {max_radius!r}')
        if end is not None and end <= begin:
            raise ValueError(f'end: expected an iteration after begin={begin}, got {end!r}')
        self.max_radius, self.begin, self.end = float(max_radius), begin, end

    def radius_at(self, iteration: int, max_iters: int) -> float:
        end = self.end if self.end is not None else max_iters
        progress = (iteration - self.begin) / max(end - self.begin, 1)
        return self.max_radius * min(max(progress, 0.0), 1.0)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        from ..layers import SparseSwitchNorm2d
        radius = self.radius_at(runner.iter, runner.max_iters)
        model = getattr(runner.model, 'module', runner.model)
        for module in model.modules():
            if isinstance(module, SparseSwitchNorm2d):
                module.radius.fill_(radius)
                module.fix_one_hot()


def random_state() -> dict:
    """The generators a training draws from in this process: torch's CPU generator, the
    current CUDA device's, numpy's global one and Python's. torch's states are kept as
    numpy arrays, which a checkpoint's ``map_location`` (the GPU on resume) leaves alone."""
    import random

    import numpy as np
    import torch
    return dict(torch=torch.get_rng_state().numpy(),
                cuda=torch.cuda.get_rng_state().numpy() if torch.cuda.is_available() else None,
                numpy=np.random.get_state(), random=random.getstate())


def set_random_state(state: dict) -> None:
    """Sets the generators saved by :func:`random_state`."""
    import random

    import numpy as np
    import torch

    def byte_tensor(saved):  # (tensors in checkpoints written before the numpy form)
        return torch.as_tensor(np.asarray(saved.cpu() if torch.is_tensor(saved) else saved),
                               dtype=torch.uint8)

    torch.set_rng_state(byte_tensor(state['torch']))
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(byte_tensor(state['cuda']))
    np.random.set_state(state['numpy'])
    random.setstate(state['random'])


class _RestoreBeforeFetch:
    """Stands in for an ``IterBasedTrainLoop``'s data iterator: lets the loop skip the
    batches already trained, then sets the saved random state right before fetching the
    first new batch (where the uninterrupted run was when it saved) and steps aside."""

    def __init__(self, loop, skips: int, state: dict):
        self._loop, self._iterator = loop, loop.dataloader_iterator
        self._skips, self._state = skips, state

    def __iter__(self):
        return self

    def __next__(self):
        if self._skips == 0:
            set_random_state(self._state)
            self._loop.dataloader_iterator = self._iterator
        self._skips -= 1
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)


class RandomStateHook(Hook):
    """Saves the random state of every process in each checkpoint and restores it on resume,
    so a resumed training continues exactly as the uninterrupted one; validation during
    training leaves the random state as it found it.

    mmengine reseeds on resume (and an ``IterBasedTrainLoop`` replays the data pipeline of
    the batches already trained), but the generators then hold other states than the
    uninterrupted run's: torch's, which the model draws from (mmdet's proposal samplers,
    dropout) and the DataLoader draws its base seed from, and numpy's and Python's, which
    the augmentations draw from. This hook stores all four (torch CPU, current CUDA device,
    numpy, random) of every process in ``checkpoint['mmsn_random_state']`` and sets them
    again where the uninterrupted run stood when it saved: right before the first new batch
    is fetched (iteration loops, after the replayed ones) or at the start of the next epoch
    (epoch loops). Validation, which draws from them too (a DataLoader base seed per
    pass), is made neutral: the state is saved before it and restored after it.

    In distributed runs only rank 0 writes the checkpoint, so the states of all processes
    are gathered to it (one small all-gather) after the iterations or epochs where the
    ``CheckpointHook`` saves.
    """

    priority = 'LOW'  # after the other hooks of an iteration, before CheckpointHook saves

    def __init__(self):
        self._gathered = None
        self._to_restore = None
        self._before_val = None

    @staticmethod
    def _checkpoint_hook(runner):
        from mmengine.hooks import CheckpointHook
        return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)

    def _gather_if_saving(self, runner, by_epoch: bool) -> None:
        from mmengine.dist import all_gather_object, get_world_size
        if get_world_size() == 1:
            return
        hook = self._checkpoint_hook(runner)
        if hook is not None:
            if hook.by_epoch != by_epoch:
                return
            due = (self.every_n_epochs(runner, hook.interval, hook.save_begin)
                   or (hook.save_last and self.is_last_train_epoch(runner))) if by_epoch else (
                self.every_n_train_iters(runner, hook.interval, hook.save_begin)
                or (hook.save_last and self.is_last_train_iter(runner)))
            if not due:
                return
        # the iteration a resume from the checkpoint saved now starts at
        self._gathered = (runner.iter if by_epoch else runner.iter + 1,
                          all_gather_object(random_state()))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._gather_if_saving(runner, by_epoch=False)

    def after_train_epoch(self, runner) -> None:
        self._gather_if_saving(runner, by_epoch=True)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_world_size
        done = checkpoint.get('meta', {}).get('iter')  # the iteration a resume starts at
        if get_world_size() == 1:
            # during validation (a best-metric checkpoint): the state training goes on with
            states = [self._before_val or random_state()]
        elif self._gathered is not None and self._gathered[0] == done:
            states = self._gathered[1]
        else:
            runner.logger.warning(
                f'RandomStateHook: this checkpoint (iteration {done}) is not saved right '
                f'after a training iteration or epoch, so no random state is stored with it; '
                f'a run resumed from it draws other random numbers')
            return
        checkpoint['mmsn_random_state'] = dict(iter=done, states=states)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from (finetuning, testing): the run's own seed decides
        self._warn_if_not_reproducible(runner)
        saved = checkpoint.get('mmsn_random_state')
        if saved is None:
            runner.logger.warning('RandomStateHook: the checkpoint holds no random state; the '
                                  'resumed run draws other random numbers')
            return
        self._to_restore = saved

    @staticmethod
    def _warn_if_not_reproducible(runner) -> None:
        """What the hook cannot give back: the data order needs a seed fixed in the config
        (mmengine builds the sampler before it reseeds from the checkpoint), and persistent
        workers of an epoch loop carry their random state across epochs."""
        from mmengine.runner import EpochBasedTrainLoop
        if (runner.cfg.get('randomness') or {}).get('seed') is None:
            runner.logger.warning(
                'RandomStateHook: the config fixes no randomness.seed, so the resumed run '
                'builds its data sampler with another seed and reads other batches')
        loader = getattr(runner.train_loop, 'dataloader', None)
        if (isinstance(runner.train_loop, EpochBasedTrainLoop) and loader is not None
                and getattr(loader, 'persistent_workers', False)):
            runner.logger.warning(
                'RandomStateHook: persistent dataloader workers keep their random state '
                'across epochs; a resumed epoch loop starts fresh ones, so augmentations '
                'differ (set persistent_workers=False for an exact resume)')

    def _restorable(self, runner) -> Optional[dict]:
        from mmengine.dist import get_rank, get_world_size
        saved, self._to_restore = self._to_restore, None
        if saved is None:
            return None
        if len(saved['states']) != get_world_size() or saved['iter'] != runner.iter:
            runner.logger.warning(
                f"RandomStateHook: the checkpoint's random state is of {len(saved['states'])} "
                f"process(es) at iteration {saved['iter']}, this run has {get_world_size()} at "
                f"{runner.iter}: not restored")
            return None
        return saved['states'][get_rank()]

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if self._to_restore is not None and hasattr(loop, 'dataloader_iterator'):
            state = self._restorable(runner)
            if state is not None:
                loop.dataloader_iterator = _RestoreBeforeFetch(loop, runner.iter, state)

    def before_train_epoch(self, runner) -> None:
        if self._to_restore is not None:  # an epoch loop: resumed at an epoch's start
            state = self._restorable(runner)
            if state is not None:
                set_random_state(state)

    def before_val(self, runner) -> None:
        self._before_val = random_state()

    def after_val(self, runner) -> None:
        if self._before_val is not None:
            set_random_state(self._before_val)
            self._before_val = None


def register_hooks() -> None:
    """Registers the hooks in mmengine's root HOOKS (idempotent)."""
    for cls in (SwitchableRatioHook, BatchAverageHook, SSNRadiusHook, RandomStateHook):
        if HOOKS.module_dict.get(cls.__name__) is not cls:
            HOOKS.register_module(module=cls)


__all__ = ['SwitchableRatioHook', 'BatchAverageHook', 'SSNRadiusHook', 'RandomStateHook',
           'register_hooks']
