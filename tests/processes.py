"""Multi-process tests with a time limit each, which end everything they started.

``run_job`` starts a command (torchrun, a tool) in a session of its own; when its limit
passes, the whole tree of processes it started is killed (torchrun starts each rank in a
session of its own, so its process group alone would leave the ranks behind).
``spawn_ranks`` does the same for ``torch.multiprocessing`` workers. Both fail the test
with the output they have.
"""
import os
import signal
import subprocess
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import torch.multiprocessing as mp


class Job:
    """A command running in its own session (process group), output to a file."""

    def __init__(self, command: Sequence[str], log_path: str, cwd: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None):
        self.log_path = log_path
        self._log = open(log_path, 'w')
        self.started = time.monotonic()
        self.process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait(self, timeout: float) -> int:
        """The exit code; past ``timeout`` seconds, kills the whole group and fails."""
        try:
            return self.process.wait(timeout=max(0.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f'job ran over its {timeout:g} s limit and was killed with '
                                 f'its process group:\n{self.output()[-5000:]}') from None
        finally:
            if self.process.returncode is not None:
                self.kill()  # (anything it left behind in its group)
                self._log.close()

    def kill(self) -> None:
        """Kills the job's whole process tree (SIGKILL also ends stopped processes)."""
        for pid in [self.process.pid] + _descendants(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def rank_pid(self, rank: int) -> Optional[int]:
        """The pid of the process of this job whose environment has ``RANK=rank``."""
        for pid in _descendants(self.process.pid):
            try:
                with open(f'/proc/{pid}/environ', 'rb') as f:
                    env = f.read().split(b'\0')
            except OSError:
                continue
            if f'RANK={rank}'.encode() in env and b'LOCAL_RANK=' + str(rank).encode() in env:
                return pid
        return None


def _descendants(root: int) -> List[int]:
    """Every process below ``root`` in the process tree (Linux ``/proc``)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])  # (state, then ppid)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_job(command: Sequence[str], timeout: float, log_path: str, cwd: Optional[str] = None,
            env: Optional[Dict[str, str]] = None, check: bool = True) -> str:
    """Runs ``command`` to its end within ``timeout`` seconds and returns its output; with
    ``check``, fails unless it exits 0."""
    job = Job(command, log_path, cwd=cwd, env=env)
    code = job.wait(timeout)
    log = job.output()
    if check:
        assert code == 0, f'exit code {code}:\n{log[-6000:]}'
    return log


def collective_timeout(spawn_timeout: float) -> timedelta:
    """The gloo timeout of ranks that :func:`spawn_ranks` runs with ``spawn_timeout``.

    Long enough for the slowest rank's work between two collectives on a loaded machine (a
    rank waits there while another runs the interpreter: SW at 64 channels a group took
    over 60 s with other tests beside it), short enough that a missed collective fails as
    an error, naming the collective, before the spawn's limit kills the ranks.
    """
    return timedelta(seconds=0.75 * spawn_timeout)


def spawn_ranks(fn: Callable, args: tuple, nprocs: int, timeout: float) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` with a limit: past ``timeout``
    seconds every worker is killed and the test fails (a worker's error fails it too)."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                 start_method='spawn')
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise AssertionError(f'{nprocs} spawned ranks ran over their {timeout:g} s '
                                     'limit and were killed')
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
