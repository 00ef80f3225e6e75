"""Checkpoint files loaded with torch's ``weights_only`` unpickler, never by running their code.

Every load in mmsn (its tools, the converter, and mmengine's local-file loader once
:func:`mmsn.mm.compat.install_checkpoint_loader` has run) goes through
:func:`load_checkpoint_file`:

* always ``torch.load(..., weights_only=True)``, which only rebuilds tensors, containers and
  the globals it is told are safe;
* told exactly the globals that mmengine's own training checkpoints hold
  (:func:`mmengine_checkpoint_globals`): numpy scalars, arrays and dtypes (``meta``,
  ``message_hub``), ``HistoryBuffer`` (``message_hub``) and the four statistics methods that
  ``HistoryBuffer`` pickles by name, reached through a ``getattr`` that resolves nothing else;
* anything else is refused with :class:`UntrustedCheckpointError`, which names the global;
  a file the user trusts is opted in by path: ``MMSN_TRUSTED_CHECKPOINTS`` (files separated
  by ``os.pathsep``; read by every process, so mmdet's and mmseg's own tools honour it) or
  ``trusted=True`` (mmsn's tools: ``--trust-checkpoint``). Only then is the file loaded with
  ``weights_only=False``;
* a truncated or corrupted file is refused with :class:`DamagedCheckpointError`, which names
  the file and what is wrong with it, before anything unpickles it
  (:func:`~mmsn.checkpoint_damage.find_checkpoint_damage`): never advice to trust a damaged
  file, never a half-loaded model.
"""
import contextlib
import os
import os.path as osp
import pickle
import re
from typing import Callable, List, Tuple, Union

import torch

from .checkpoint_damage import inspect_file, load_error_damage, missing_global

#: Environment variable listing checkpoint files (os.pathsep-separated) the user trusts to
#: be unpickled with ``weights_only=False``.
TRUSTED_CHECKPOINTS_ENV = 'MMSN_TRUSTED_CHECKPOINTS'

#: The methods ``HistoryBuffer.__getstate__`` pickles (as ``getattr(HistoryBuffer, name)``).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs more than the safe globals and the user has not trusted it."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file is truncated or corrupted (or is no PyTorch checkpoint at all), so
    nothing was loaded from it.

    A ``RuntimeError``, as torch's own errors for such files are.

    Args:
        filename (str): the file.
        problem (str): what is wrong with it, a sentence that follows the file name
            ("is a damaged checkpoint: ...").
    """

    def __init__(self, filename: str, problem: str):
        self.filename = filename
        self.problem = problem
        super().__init__(f'{filename} {problem}. Nothing was loaded from it; use another '
                         f'checkpoint{_other_checkpoints(filename)}.')


def _other_checkpoints(filename: str, shown: int = 3) -> str:
    """The newest other ``.pth`` files next to ``filename``: where a user whose last
    checkpoint is damaged finds the one before it."""
    path = osp.abspath(filename)
    try:
        others = [entry for entry in os.scandir(osp.dirname(path))
                  if entry.name.endswith('.pth') and entry.path != path and entry.is_file()]
        others.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    except OSError:
        return ''
    if not others:
        return ''
    return (' (others in its directory, newest first: '
            f'{", ".join(entry.name for entry in others[:shown])})')


def supports_safe_loading() -> bool:
    """Whether this torch can load with extra safe globals, named by their pickled path
    (``torch.serialization.safe_globals`` with ``(object, name)`` pairs, torch >= 2.6)."""
    if not hasattr(torch.serialization, 'safe_globals'):
        return False
    version = tuple(int(p) for p in re.findall(r'\d+', torch.__version__)[:2])
    return version >= (2, 6)


def _numpy_globals() -> List[object]:
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    try:
        import numpy.dtypes
        dtype_classes = [c for c in vars(numpy.dtypes).values()
                         if isinstance(c, type) and issubclass(c, np.dtype)]
    except ImportError:  # numpy < 1.25: the dtype classes only exist as type(np.dtype(...))
        dtype_classes = [type(np.dtype(t)) for t in np.sctypeDict.values()]
    # Only constructors of plain data: np.dtype / np.ndarray / _reconstruct build arrays from
    # bytes, scalar builds a numpy scalar from a dtype and bytes.
    return [np.dtype, np.ndarray, _reconstruct, scalar] + dtype_classes


def _history_buffer_globals() -> List[Union[object, Tuple[Callable, str]]]:
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return []

    def history_buffer_method(owner, name):
        # Stands in for builtins.getattr while loading: HistoryBuffer pickles its statistics
        # methods as getattr(HistoryBuffer, 'min'); a general getattr would hand any
        # attribute of any allowed class to the file.
        if owner is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
            return getattr(HistoryBuffer, name)
        raise UntrustedCheckpointError(
            f'the checkpoint asks for getattr({owner!r}, {name!r}); only the HistoryBuffer '
            f'statistics {_HISTORY_BUFFER_STATISTICS} are allowed')

    return [HistoryBuffer, (history_buffer_method, 'builtins.getattr')]


@contextlib.contextmanager
def _history_buffer_class_state_kept():
    """``HistoryBuffer.__setstate__`` merges a file's ``statistics_methods`` into a CLASS
    attribute: whatever a file puts there (a refused file included) would change every
    HistoryBuffer of the process. Its methods are the only legitimate values, and the
    defaults already hold them, so the class attribute is put back as it was."""
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        yield
        return
    kept = dict(HistoryBuffer._statistics_methods)
    try:
        yield
    finally:
        HistoryBuffer._statistics_methods.clear()
        HistoryBuffer._statistics_methods.update(kept)
        for name in _HISTORY_BUFFER_STATISTICS:  # empty until a first HistoryBuffer is made
            HistoryBuffer._statistics_methods.setdefault(name, getattr(HistoryBuffer, name))


def mmengine_checkpoint_globals() -> List[Union[object, Tuple[Callable, str]]]:
    """The globals an mmengine (0.10) checkpoint holds besides tensors and containers."""
    return _numpy_globals() + _history_buffer_globals()


def trusted_checkpoints() -> List[str]:
    """The real paths listed in ``MMSN_TRUSTED_CHECKPOINTS``."""
    listed = os.environ.get(TRUSTED_CHECKPOINTS_ENV, '')
    return [osp.realpath(osp.expanduser(p.strip())) for p in listed.split(os.pathsep)
            if p.strip()]


def is_trusted(filename: str) -> bool:
    return osp.realpath(osp.expanduser(filename)) in trusted_checkpoints()


def _refusal(error: Exception) -> str:
    """What torch's weights_only unpickler refused, from its message."""
    text = str(error)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return f'the global {found.group(1)}'
    detail = text.split('WeightsUnpickler error:')[-1].strip().split('\n')[0]
    return detail or type(error).__name__


def load_checkpoint_file(filename: str, map_location=None, trusted: bool = False):
    """Loads a checkpoint file without running code from it.

    Args:
        filename (str): a local file.
        map_location: as for ``torch.load``.
        trusted (bool): the caller's user trusts this very file: if the safe load refuses
            it, load it with ``weights_only=False``. Files listed in
            ``MMSN_TRUSTED_CHECKPOINTS`` are trusted too.

    Raises:
        FileNotFoundError: no such file.
        DamagedCheckpointError: the file is truncated or corrupted, or is no checkpoint
            (:func:`~mmsn.checkpoint_damage.find_checkpoint_damage`), found before anything
            is unpickled, trusted or not. The message names the file and what is wrong.
        UntrustedCheckpointError: the file is intact but needs a global outside
            :func:`mmengine_checkpoint_globals` and is not trusted. The message names the
            global and how to trust the file.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    # Before anything unpickles the file: torch.load names neither the file nor the damage,
    # loads a changed byte of tensor data silently, and refuses a garbled pickle as if it
    # named an untrusted global (with advice to load it with weights_only=False).
    problem, checksummed = inspect_file(filename)
    if problem is not None:
        raise DamagedCheckpointError(filename, problem)
    try:
        with _history_buffer_class_state_kept():
            if supports_safe_loading():
                with torch.serialization.safe_globals(mmengine_checkpoint_globals()):
                    return torch.load(filename, map_location=map_location, weights_only=True)
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = error
    except Exception as error:
        problem = load_error_damage(error, checksummed)
        if problem is None:
            raise
        raise DamagedCheckpointError(filename, problem) from None  # torch's text adds nothing
    # Without checksums, a name that exists nowhere is more likely a garbled byte than a class
    # of the file's author: no advice to trust the file (unpickling it would fail anyway).
    missing = None if checksummed else missing_global(refused)
    if missing is not None:
        raise DamagedCheckpointError(
            filename, f'is a damaged checkpoint, or one that needs code not installed here: '
            f'it names {missing}, which does not exist here')
    if trusted or is_trusted(filename):
        return torch.load(filename, map_location=map_location, weights_only=False)
    raise UntrustedCheckpointError(
        f'{filename}: weights_only loading refused it ({_refusal(refused)}): it holds more '
        f'than tensors, containers and the types of mmengine checkpoints, and unpickling '
        f'it would run code from the file. If you trust this file, allow it by path: '
        f'{TRUSTED_CHECKPOINTS_ENV}={osp.realpath(filename)} (several files separated '
        f'by {os.pathsep!r}), or --trust-checkpoint with mmsn\'s tools.') from refused


def trust_checkpoint(filename: str) -> None:
    """Adds ``filename`` to ``MMSN_TRUSTED_CHECKPOINTS`` for this process and its children
    (what the tools' ``--trust-checkpoint`` does for the file they are given)."""
    listed = [p for p in os.environ.get(TRUSTED_CHECKPOINTS_ENV, '').split(os.pathsep) if p]
    os.environ[TRUSTED_CHECKPOINTS_ENV] = os.pathsep.join(listed + [osp.realpath(filename)])


def add_trust_option(parser) -> None:
    """``--trust-checkpoint`` for a tool's argparse parser."""
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='load the given checkpoint even if it holds more than weights and the types of '
             'mmengine checkpoints (weights_only=False: this runs code from the file, so only '
             f'for files you trust; {TRUSTED_CHECKPOINTS_ENV} does the same by path)')
