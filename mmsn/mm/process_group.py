"""The process group of a training or test run (``launch.py``): created for CPU runs, ended
in order after a good run, and, when a collective times out, the processes that stopped
responding named."""
import contextlib
import gc
import os
import time
import warnings
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist


def init_cpu_distributed(timeout: Optional[float] = None) -> None:
    """Creates the gloo process group from torchrun's environment (CPU-only runs).

    Args:
        timeout (float, optional): seconds a collective waits for the other processes
            before it fails (mmengine's ``env_cfg.dist_cfg.timeout``, which mmengine itself
            passes on only on GPUs). Defaults to None: torch's default, 30 minutes.
    """
    if dist.is_initialized():
        return
    options = {} if timeout is None else {'timeout': timedelta(seconds=timeout)}
    dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                            world_size=int(os.environ['WORLD_SIZE']), **options)


def dist_timeout(cfg) -> Optional[float]:
    """``env_cfg.dist_cfg.timeout`` of ``cfg`` in seconds (None when unset)."""
    timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError('env_cfg.dist_cfg.timeout: expected a positive number of seconds, '
                         f'got {timeout!r}')
    return float(timeout)


def _gloo_threads() -> List[str]:
    """Names of gloo's native threads alive in this process (Linux; [] elsewhere)."""
    names = []
    with contextlib.suppress(OSError):
        for task in os.listdir('/proc/self/task'):
            with contextlib.suppress(OSError), open(f'/proc/self/task/{task}/comm') as f:
                name = f.read().strip()
                if 'gloo' in name:
                    names.append(name)
    return names


def finish_distributed() -> None:
    """Ends a distributed run that finished well, so that its processes exit cleanly.

    gloo runs each collective on a worker thread, which drops its reference to the finished
    work after the caller has moved on. When that is the last reference to a tensor Python
    has already let go, the worker takes the GIL to free the tensor's Python object; if the
    interpreter is finalizing by then, Python ends the thread with ``pthread_exit``, whose
    unwinding through the work's (noexcept) destructor calls ``std::terminate``: SIGABRT,
    "terminate called without an active exception", and torchrun reports a good run as
    failed. ``destroy_process_group()`` alone does not stop the threads while anything else
    holds the group (the runner's DistributedDataParallel reducer does). So, in order: every
    process passes a barrier (no peer is still in a collective), the reference cycles that
    hold the model are collected (the caller has deleted its runner), and the group is
    destroyed, which joins gloo's threads while the interpreter is alive. Threads left after
    that (something still holds the group) are reported with a warning.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    threaded = dist.get_backend() == 'gloo'
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()
    left = _gloo_threads() if threaded else []
    if left:
        warnings.warn(f'mmsn: gloo threads still running after destroy_process_group '
                      f'({", ".join(left)}): something still holds the process group, and '
                      'the process may abort at exit', RuntimeWarning, stacklevel=2)


#: the store key prefix under which processes say they are alive after a collective timed out
_RESPONSIVE_KEY = 'mmsn/responsive/'


def _group_timeout() -> float:
    """The default process group's collective timeout in seconds (torch's default, 1800,
    where the group does not expose it)."""
    try:
        backend = dist.group.WORLD._get_backend(torch.device('cpu'))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return 1800.0


@contextlib.contextmanager
def reporting_unresponsive_processes():
    """Names the processes that stopped responding when a collective inside times out.

    A gloo collective that times out closes its connections, so no collective can find the
    culprit afterwards; the job's key-value store (torchrun's) still works. Every process
    whose collective timed out writes a key there, waits up to the group's timeout for the
    others' keys, and raises an error naming the ranks that wrote none (stopped, hung or
    dead). Other errors pass through unchanged.
    """
    try:
        yield
    except RuntimeError as error:
        if not (dist.is_available() and dist.is_initialized()) or \
                'timed out' not in str(error).lower():
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        store = dist.distributed_c10d._get_default_store()
        store.set(f'{_RESPONSIVE_KEY}{rank}', '1')
        wait = _group_timeout()
        deadline = time.monotonic() + wait
        missing = list(range(world))
        while True:
            missing = [r for r in missing if not store.check([f'{_RESPONSIVE_KEY}{r}'])]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        who = (f'rank(s) {", ".join(map(str, missing))} did not respond within {wait:g} s '
               '(stopped, hung or dead)') if missing else \
            'every rank responded afterwards (a slow rank, or a network fault)'
        raise RuntimeError(
            f'rank {rank}: a collective did not complete within the process group\'s timeout '
            f'({wait:g} s, env_cfg.dist_cfg.timeout); {who}. Ending the job.') from error
