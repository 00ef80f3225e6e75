"""Finding damage in a checkpoint file before anything unpickles it (``mmsn.checkpoint``
refuses a damaged file with ``DamagedCheckpointError``).

:func:`find_checkpoint_damage` reads a file's structure without running or loading anything:
the zip directory and each record's checksum for torch's zip format, the pickle's opcodes,
and the storages' sizes against the bytes present for the legacy format. What torch's loader
still raises on an intact-looking file is read by :func:`load_error_damage` and
:func:`missing_global`: damage, or an error of another kind.
"""
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
from typing import Dict, List, Optional, Tuple

import torch

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
    return inspect_file(filename)[0]


def inspect_file(filename: str) -> Tuple[Optional[str], bool]:
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


def missing_global(error: Exception) -> Optional[str]:
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


def load_error_damage(error: Exception, checksummed: bool) -> Optional[str]:
    """What ``torch.load``'s ``error`` says about a file that :func:`inspect_file` found intact:
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
