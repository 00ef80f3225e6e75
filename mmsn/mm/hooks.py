"""mmengine hooks: ratio logging and batch-average inference statistics."""

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..analysis import model_ratios, ratio_scalars
from ..batch_average import batch_average_statistics


class SwitchableRatioHook(Hook):
    """Sends the softmax ratios of every SN/SW layer to the visualizer backends every
    ``interval`` training iterations (scalars ``ratios/<layer>/<mean|var>_<statistic>``),
    and keeps the final ratios in the checkpoint's ``meta['switchable_ratios']``.

    Args:
        interval (int): iterations between two records. Defaults to 50.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ValueError(f'interval: expected a positive int, got {interval!r}')
        self.interval = interval

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
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f'num_batches: expected a positive int, got {num_batches!r}')
        self.num_batches = num_batches
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


def register_hooks() -> None:
    """Registers the hooks in mmengine's root HOOKS (idempotent)."""
    for cls in (SwitchableRatioHook, BatchAverageHook):
        if HOOKS.module_dict.get(cls.__name__) is not cls:
            HOOKS.register_module(module=cls)


__all__ = ['SwitchableRatioHook', 'BatchAverageHook', 'register_hooks']
