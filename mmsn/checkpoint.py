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
  (:func:`find_checkpoint_damage`): never advice to trust a damaged file, never a half-loaded
  model.

:func:`atomic_write` writes a file so that it is never seen half written (a temporary name in
the same directory, fsync, then a rename); ``mmsn.mm.checkpoint_hook`` saves training
checkpoints through it.
"""
import contextlib
import importlib.util
import io
import os
import os.path as osp
import pickle
import pickletools
import re
import struct
import sys
import zipfile
from typing import IO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

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


_ZIP_MAGIC = b'PK\x03\x04'
_INTERRUPTED = 'a save that was interrupted leaves this'
#: Bytes per element of the storage classes that legacy (non-zip) checkpoints name.
_LEGACY_ELEMENT_BYTES = {
    'DoubleStorage': 8, 'FloatStorage': 4, 'HalfStorage': 2, 'BFloat16Storage': 2,
    'LongStorage': 8, 'IntStorage': 4, 'ShortStorage': 2, 'CharStorage': 1, 'ByteStorage': 1,
    'BoolStorage': 1, 'ComplexFloatStorage': 8, 'ComplexDoubleStorage': 16,
    'UntypedStorage': 1}
#: What a legacy checkpoint calls to make a tensor of (storage, offset, size, stride, ...).
_REBUILD_TENSOR = ('torch._utils._rebuild_tensor', 'torch._utils._rebuild_tensor_v2')


def find_checkpoint_damage(filename: str) -> Optional[str]:
    """What makes ``filename`` a damaged checkpoint, if anything; reads the file without
    unpickling anything from it.

    * Zip checkpoints (``torch.save``'s format since torch 1.6): the zip directory, which
      ``torch.save`` writes last, must be there and every record must match its CRC-32.
      ``torch.load`` checks neither: a truncated file fails with an error that names neither
      the file nor the cause, and a changed byte of tensor data loads silently. Files saved
      under ``torch.serialization.set_crc32_options(False)`` carry no checksums; only their
      pickle's well-formedness is checked.
    * Legacy checkpoints (``_use_new_zipfile_serialization=False``, e.g. releases of 2018):
      the magic number, the header pickles, the pickled object (walked with placeholders for
      every global it names, so nothing it names runs), every tensor within its storage, and
      every storage's data present, as long as the object says. The format has no
      checksums: changed bytes inside tensor data go unseen.
    * Anything else (an empty file, a file that begins like neither) is not a checkpoint, or
      is damaged at its start. torch's old tar format is left to ``torch.load``.

    Args:
        filename (str): a local file.

    Returns:
        str or None: what is wrong, as a sentence that follows the file name ("is a damaged
        checkpoint: ..."); None when nothing is found.
    """
    return _inspect(filename)[0]


def _inspect(filename: str) -> Tuple[Optional[str], bool]:
    """:func:`find_checkpoint_damage`'s answer, and whether checksums vouch for the bytes
    (then a global the file names is really in the file, not a garbled one)."""
    size = osp.getsize(filename)
    if size == 0:
        return f'is a damaged checkpoint: it is empty ({_INTERRUPTED})', False
    with open(filename, 'rb') as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        return _zip_damage(filename)
    if _ZIP_MAGIC.startswith(head):
        return (f'is a damaged checkpoint: truncated after {size} bytes of its zip header '
                f'({_INTERRUPTED})'), False
    if head[257:262] == b'ustar':  # torch's format before 0.1.10: a tar archive
        return None, False
    return _legacy_damage(filename, size), False


class _Discard:
    """A text stream that keeps nothing (``pickletools.dis`` must print somewhere)."""

    def write(self, text: str) -> None:
        pass


def _zip_damage(filename: str) -> Tuple[Optional[str], bool]:
    try:
        with zipfile.ZipFile(filename) as archive:
            records = archive.infolist()
            # torch.save under set_crc32_options(False) writes 0 as every checksum
            checksums = any(record.CRC for record in records if record.file_size)
            for record in records:
                # What Python's zipfile ignores and torch's reader (miniz) does not: it
                # refuses encrypted and multi-disk records, and reads a record with the
                # MS-DOS directory attribute as an empty directory. torch.save sets none.
                if record.flag_bits & 0x1 or record.volume or record.external_attr & 0x10:
                    return (f'is a damaged checkpoint: the zip directory entry of '
                            f'{record.filename} is corrupted (flags {record.flag_bits:#x}, '
                            f'disk {record.volume}, attributes {record.external_attr:#x})'), True
                try:
                    with archive.open(record) as data:
                        while data.read(1 << 24):  # zipfile compares the CRC-32 at the end
                            pass
                except zipfile.BadZipFile as error:
                    if checksums or not str(error).startswith('Bad CRC-32'):
                        return (f'is a damaged checkpoint: its record {record.filename} is '
                                f'corrupted ({error})'), True
            pickles = [r for r in records if r.filename.rpartition('/')[2] == 'data.pkl']
            if not pickles:
                return 'is a damaged checkpoint: its zip archive holds no data.pkl', checksums
            if checksums:
                return None, True
            pickled = _stored_bytes(filename, pickles[0])
            return _pickle_damage(pickled, 'its pickled object'), False
    except zipfile.BadZipFile as error:
        if str(error) == 'File is not a zip file':
            return ('is a damaged checkpoint: truncated, it has no zip directory at its end, '
                    f'which torch.save writes last ({_INTERRUPTED})'), True
        return f'is a damaged checkpoint: its zip structure is corrupted ({error})', True
    except Exception as error:  # what else a garbled zip directory makes zipfile raise
        return (f'is a damaged checkpoint: its zip structure is corrupted '
                f'({type(error).__name__}: {error})'), True


def _stored_bytes(filename: str, record: zipfile.ZipInfo) -> bytes:
    """The data of a stored (uncompressed, as torch.save writes) zip record, read past its
    local header without the CRC-32 comparison that zipfile would make."""
    if record.compress_type != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile(f'{record.filename} is compressed; torch.save stores records')
    with open(filename, 'rb') as f:
        f.seek(record.header_offset)
        header = f.read(30)  # the local file header: its last two fields are variable sizes
        if len(header) < 30 or header[:4] != _ZIP_MAGIC:
            raise zipfile.BadZipFile(f'{record.filename}: bad local header')
        name_length, extra_length = struct.unpack('<HH', header[26:30])
        f.seek(name_length + extra_length, os.SEEK_CUR)
        data = f.read(record.compress_size)
    if len(data) < record.compress_size:
        raise zipfile.BadZipFile(f'{record.filename}: truncated')
    return data


def _pickle_damage(data: bytes, what: str) -> Optional[str]:
    try:  # parses the opcodes and follows the stack; builds nothing
        pickletools.dis(io.BytesIO(data), out=_Discard())
    except Exception as error:
        return f'is a damaged checkpoint: {what} is not a well-formed pickle ({error})'
    return None


class _PlainUnpickler(pickle.Unpickler):
    """Builds numbers, strings and containers only: what the pickles around a legacy
    checkpoint's object hold (magic number, protocol version, system info, storage keys)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'a global ({module}.{name}) where none belongs')

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('a persistent id where none belongs')


class _Placeholder:
    """Stands in for every global a legacy checkpoint's object names: takes any arguments
    and state and keeps none, so the pickle is walked without running what it names."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _StorageRecord:
    """A tensor storage of a legacy checkpoint, as its object describes it."""

    def __init__(self, numel, element_bytes: Optional[int]):
        self.numel = numel
        self.element_bytes = element_bytes


class _SkeletonUnpickler(pickle.Unpickler):
    """Walks a legacy checkpoint's object with placeholders for its globals, noting the
    storages it uses and tensors that reach outside their storage."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: Dict[str, _StorageRecord] = {}
        self.problems: List[str] = []
        self._placeholders: Dict[str, type] = {}

    def find_class(self, module, name):
        qualified = f'{module}.{name}'
        placeholder = self._placeholders.get(qualified)
        if placeholder is None:
            attributes = dict(qualified_name=qualified)
            if qualified in _REBUILD_TENSOR:
                unpickler = self

                def check_tensor(placeholder_self, *args, **kwargs):
                    unpickler._check_tensor(args)

                attributes['__init__'] = check_tensor
            placeholder = type('Placeholder', (_Placeholder,), attributes)
            self._placeholders[qualified] = placeholder
        return placeholder

    def persistent_load(self, pid):
        # ('storage', storage class, key, location, numel, view metadata): torch's legacy ids
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
            return None
        storage_class = getattr(pid[1], 'qualified_name', '')
        module, _, name = storage_class.rpartition('.')
        record = self.storages.get(pid[2])
        if record is None:
            record = _StorageRecord(pid[4], _LEGACY_ELEMENT_BYTES.get(name)
                                    if module == 'torch' else None)
            self.storages[pid[2]] = record
        if len(pid) > 5 and pid[5] is not None:
            return None  # a view of the storage (torch < 0.4): no bounds to check here
        return record

    def _check_tensor(self, args) -> None:
        if len(args) < 4 or not isinstance(args[0], _StorageRecord):
            return
        storage, offset, size, stride = args[:4]
        numbers = [offset, storage.numel, *size, *stride] if isinstance(
            size, tuple) and isinstance(stride, tuple) else None
        if numbers is None or not all(type(n) is int for n in numbers) or len(size) != len(
                stride):
            self.problems.append(f'is a damaged checkpoint: a tensor has the shape {size!r}, '
                                 f'the strides {stride!r} and the offset {offset!r}')
            return
        if 0 in size:
            return
        end = offset + sum((s - 1) * t for s, t in zip(size, stride)) + 1
        negative = offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0
        if negative or end > storage.numel:
            self.problems.append(
                f'is a damaged checkpoint: a tensor of shape {tuple(size)} at offset {offset} '
                f'reaches element {end} of a storage of {storage.numel}')


def _unpickling_damage(what: str, error: Exception, size: int) -> str:
    if isinstance(error, EOFError) or 'truncated' in str(error):
        return (f'is a damaged checkpoint: truncated, the file ends inside {what} (after '
                f'{size} bytes; {_INTERRUPTED})')
    return (f'is a damaged checkpoint: {what} does not unpickle '
            f'({type(error).__name__}: {error})')


def _legacy_damage(filename: str, size: int) -> Optional[str]:
    magic_number = torch.serialization.MAGIC_NUMBER
    with open(filename, 'rb') as f:
        try:
            magic = _PlainUnpickler(f).load()
        except Exception:
            magic = None
        if type(magic) is not int or magic != magic_number:
            f.seek(0)
            start = f.read(64)
            if any(pickle.dumps(magic_number, protocol=p).startswith(start)
                   for p in range(2, pickle.HIGHEST_PROTOCOL + 1)):
                return (f'is a damaged checkpoint: truncated after {size} bytes of its '
                        f'magic number ({_INTERRUPTED})')
            return ("is not a PyTorch checkpoint, or is damaged at its start: it begins with "
                    "neither a zip header nor the magic number of torch's legacy format")
        what = 'its header'
        try:
            version = _PlainUnpickler(f).load()
            system = _PlainUnpickler(f).load()
            what = 'its pickled object'
            skeleton = _SkeletonUnpickler(f)
            skeleton.load()
            what = 'its list of tensor storages'
            keys = _PlainUnpickler(f).load()
        except Exception as error:
            return _unpickling_damage(what, error, size)
        if version != torch.serialization.PROTOCOL_VERSION or not isinstance(system, dict):
            return (f'is a damaged checkpoint: its header says protocol {version!r}, torch '
                    f'writes {torch.serialization.PROTOCOL_VERSION}')
        if skeleton.problems:
            return skeleton.problems[0]
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            return 'is a damaged checkpoint: its list of tensor storages is not a list of keys'
        order = 'little' if system.get('little_endian', True) else 'big'
        for index, key in enumerate(keys, 1):
            where = f'tensor storage {index} of {len(keys)}'
            record = skeleton.storages.get(key)
            if record is None:
                return (f'is a damaged checkpoint: its list of tensor storages names {key!r}, '
                        f'which its object does not use')
            header = f.read(8)
            if len(header) < 8:
                return (f'is a damaged checkpoint: truncated, the file ends before the data '
                        f'of {where} (after {size} bytes; {_INTERRUPTED})')
            numel = int.from_bytes(header, order, signed=True)
            if numel != record.numel:
                return (f'is a damaged checkpoint: {where} holds {numel} elements by its '
                        f'header, {record.numel!r} by the object')
            if record.element_bytes is None:
                return None  # a storage class not known here: torch.load reads on
            end = f.tell() + numel * record.element_bytes
            if end > size:
                return (f'is a damaged checkpoint: truncated, the file ends inside the data '
                        f'of {where} (after {size} of {end} bytes; {_INTERRUPTED})')
            f.seek(end)
    return None


def _missing_global(error: Exception) -> Optional[str]:
    """The global torch's unpickler refused, when it exists nowhere here: no such top-level
    module, or no such attribute of a module already imported. None when it exists, or when
    telling would mean importing a module."""
    found = re.search(r'GLOBAL ([\w.]+)', str(error))
    if not found:
        return None
    name = found.group(1)
    parts = name.split('.')
    try:
        if importlib.util.find_spec(parts[0]) is None:
            return name
    except (ImportError, ValueError):
        return name
    for end in range(len(parts) - 1, 0, -1):
        target = sys.modules.get('.'.join(parts[:end]))
        if target is None:
            continue
        for attribute in parts[end:]:
            try:
                target = getattr(target, attribute)
            except Exception:
                return name
        return None
    return None


#: Error types that loading a file whose structure checked out still raises when its bytes
#: are garbled (numpy's reconstructors, struct, decoding); torch's zip reader raises
#: RuntimeError('PytorchStreamReader failed ...') for zip structures it refuses.
_GARBLED_DATA_ERRORS = (EOFError, ValueError, TypeError, IndexError, KeyError,
                        UnicodeDecodeError, struct.error)


def _load_damage(error: Exception, checksummed: bool) -> Optional[str]:
    """What ``torch.load``'s ``error`` says about a file that :func:`_inspect` found intact:
    damage, or None for errors of another kind (e.g. a ``map_location`` without CUDA)."""
    text = str(error)
    if isinstance(error, RuntimeError) and 'PytorchStreamReader failed' in text:
        reason = text.split('failed reading zip archive:')[-1].split('. This is an')[0].strip()
        return f'is a damaged checkpoint: torch cannot read its zip structure ({reason})'
    if checksummed:
        return None  # the bytes are as written: not damage
    if isinstance(error, _GARBLED_DATA_ERRORS) or (
            isinstance(error, RuntimeError) and 'corrupt' in text):
        first_line = text.strip().split('\n')[0]
        return (f'is a damaged checkpoint (its format has no checksums): loading it failed '
                f'({type(error).__name__}: {first_line})')
    return None


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
            (:func:`find_checkpoint_damage`), found before anything is unpickled, trusted or
            not. The message names the file and what is wrong.
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
    problem, checksummed = _inspect(filename)
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
        problem = _load_damage(error, checksummed)
        if problem is None:
            raise
        raise DamagedCheckpointError(filename, problem) from None  # torch's text adds nothing
    # Without checksums, a name that exists nowhere is more likely a garbled byte than a class
    # of the file's author: no advice to trust the file (unpickling it would fail anyway).
    missing = None if checksummed else _missing_global(refused)
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
