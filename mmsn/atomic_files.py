"""Files that are never seen half written: :func:`atomic_write` writes under a temporary
name in the same directory (:data:`PARTIAL_SUFFIX`), fsyncs, then renames
(``mmsn.mm.checkpoint_hook`` saves training checkpoints through it)."""
import contextlib
import os
import os.path as osp
import re
from typing import IO, Iterator

#: The suffix of the temporary file :func:`atomic_write` writes before renaming it.
PARTIAL_SUFFIX = '.partial'


def partial_name(path: str) -> str:
    """The temporary name :func:`atomic_write` gives ``path`` while writing it, in the same
    directory (a rename across file systems is not atomic) and with this process's id (two
    writers of one path never share one temporary file)."""
    return f'{path}.{os.getpid()}{PARTIAL_SUFFIX}'


def is_partial_name(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` (left by a kill)."""
    return re.fullmatch(rf'.+\.\d+{re.escape(PARTIAL_SUFFIX)}', osp.basename(name)) is not None


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (where the platform allows it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems (and Windows) cannot sync a directory
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', **open_kwargs) -> Iterator[IO]:
    """Writes ``path`` so that no reader, and no kill at any moment, sees it half written.

    Yields a file opened at :func:`partial_name` (same directory); once the block ends, the
    file is flushed and fsynced, renamed to ``path`` (``os.replace``: atomic, and replaces
    an older ``path``), and the directory is fsynced so the rename is durable before
    anything that relies on it (e.g. removing the previous checkpoint). If the block raises,
    the temporary file is removed and ``path`` is as it was.

    Args:
        path (str): the file to write.
        mode (str): ``'wb'`` or ``'w'``. Defaults to ``'wb'``.
        **open_kwargs: passed to ``open`` (e.g. ``encoding``).
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    partial = partial_name(path)
    try:
        with open(partial, mode, **open_kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    _fsync_directory(osp.dirname(osp.abspath(path)))
