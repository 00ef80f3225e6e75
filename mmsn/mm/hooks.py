"""mmengine hooks: ratio logging, batch-average inference statistics, the SSN radius."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..analysis import model_ratios, ratio_scalars
from ..batch_average import batch_average_statistics
from ..layers.base import check_positive_int


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
        used = batch_average_statistics(model, runner.train_dataloader, model.val_step,
                                        self.num_batches)
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


class RandomStateHook(Hook):
    """Saves the random state the model draws from in each checkpoint and restores it on
    resume, so a resumed training continues exactly as the uninterrupted one.

    mmengine reseeds on resume and replays the data pipeline of the batches already trained
    (``IterBasedTrainLoop`` fetches and drops them), which reproduces the data order and the
    numpy/random draws of the augmentations; but torch's generator, which the model draws
    from (mmdet's RPN/R-CNN samplers, dropout), restarts from the seed. This hook stores
    torch's CPU (and CUDA) generator state of every process in
    ``checkpoint['mmsn_random_state']`` and sets it again right before the first resumed
    iteration. In distributed runs every process's state is gathered to the saving process
    after each training iteration (one small all-gather), as only that process writes.
    """

    priority = 'LOW'  # after the other hooks of an iteration, before CheckpointHook saves

    def __init__(self):
        self._gathered = None
        self._to_restore = None

    @staticmethod
    def _local_state() -> dict:
        import torch
        return dict(torch=torch.get_rng_state(),
                    cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        from mmengine.dist import all_gather_object, get_world_size
        if get_world_size() > 1:
            self._gathered = (runner.iter + 1, all_gather_object(self._local_state()))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_world_size
        done = checkpoint.get('meta', {}).get('iter')  # the iteration a resume starts at
        if get_world_size() == 1:
            states = [self._local_state()]
        elif self._gathered is not None and self._gathered[0] == done:
            states = self._gathered[1]
        else:  # not saved right after a training iteration: no exact state to give
            return
        checkpoint['mmsn_random_state'] = dict(iter=done, states=states)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get('mmsn_random_state')
        if saved is None:
            runner.logger.warning('RandomStateHook: the checkpoint holds no random state; the '
                                  'resumed run draws different random numbers in the model')
            return
        self._to_restore = saved

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._to_restore is None:
            return
        import torch
        from mmengine.dist import get_rank, get_world_size
        saved, self._to_restore = self._to_restore, None
        if len(saved['states']) != get_world_size() or saved['iter'] != runner.iter:
            runner.logger.warning(
                f"RandomStateHook: the checkpoint's random state is of {len(saved['states'])} "
                f"process(es) at iteration {saved['iter']}, this run has {get_world_size()} at "
                f"{runner.iter}: not restored")
            return
        state = saved['states'][get_rank()]
        torch.set_rng_state(state['torch'])
        if state['cuda'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda'])


def register_hooks() -> None:
    """Registers the hooks in mmengine's root HOOKS (idempotent)."""
    for cls in (SwitchableRatioHook, BatchAverageHook, SSNRadiusHook, RandomStateHook):
        if HOOKS.module_dict.get(cls.__name__) is not cls:
            HOOKS.register_module(module=cls)


__all__ = ['SwitchableRatioHook', 'BatchAverageHook', 'SSNRadiusHook', 'RandomStateHook',
           'register_hooks']
