"""``StrictPretrained``: backbone initialisation from a converted checkpoint, strictly.

mmengine's ``Pretrained`` loads with ``strict=False``: a checkpoint whose names do not match
leaves the model at its random initialisation with only a log line, and a missing file raises
a bare FileNotFoundError. The SN/SW configs start from converted ImageNet models, so they
use this initializer instead: it says which file to convert and how when the checkpoint is
absent, and refuses a checkpoint that leaves any parameter or buffer unfilled.
"""
import os.path as osp
from typing import Optional

from mmengine.model.weight_init import PretrainedInit, update_init_info
from mmengine.registry import WEIGHT_INITIALIZERS


class StrictPretrainedInit(PretrainedInit):
    """Loads ``checkpoint`` into the module with ``strict=True``.

    Args:
        checkpoint (str): path (or URL) of the converted checkpoint.
        prefix (str, optional): load only the keys under this prefix (e.g. 'backbone.').
        map_location (str): as for ``torch.load``. Defaults to 'cpu'.
        source (str, optional): the released model this one is converted from, named in the
            error message when ``checkpoint`` is missing.
        convert_options (str): converter options that produce this file, for that message.
    """

    def __init__(self, checkpoint: str, prefix: Optional[str] = None,
                 map_location: str = 'cpu', source: Optional[str] = None,
                 convert_options: str = ''):
        super().__init__(checkpoint, prefix, map_location)
        self.source = source
        self.convert_options = convert_options

    def missing_file_message(self) -> str:
        message = (f'StrictPretrained: the pretrained backbone {self.checkpoint!r} does not '
                   f'exist. ')
        if self.source:
            message += f'Convert the released ImageNet model ({self.source}) with\n'
        else:
            message += 'Convert the released ImageNet model SRC with\n'
        options = f'{self.convert_options} ' if self.convert_options else ''
        message += f'    mmsn-sn2mm {options}SRC {self.checkpoint}\n'
        return message + ('(python tools/model_converters/sn2mm.py in a checkout; README, '
                          '"Pretrained backbones"), or set model.backbone.init_cfg=None to '
                          'train from scratch on purpose.')

    def __call__(self, module):
        from mmengine.logging import print_log
        from mmengine.runner.checkpoint import (_load_checkpoint_with_prefix, load_checkpoint,
                                                load_state_dict)
        if '://' not in self.checkpoint and not osp.isfile(self.checkpoint):
            raise FileNotFoundError(self.missing_file_message())
        print_log(f'load {self.prefix or "model"} strictly from: {self.checkpoint}',
                  logger='current')
        if self.prefix is None:
            load_checkpoint(module, self.checkpoint, map_location=self.map_location,
                            strict=True, logger='current')
        else:
            state_dict = _load_checkpoint_with_prefix(self.prefix, self.checkpoint,
                                                      map_location=self.map_location)
            load_state_dict(module, state_dict, strict=True, logger='current')
        if hasattr(module, '_params_init_info'):
            update_init_info(module, init_info=self._get_init_info())


def register_initializers() -> None:
    """Registers ``StrictPretrained`` in mmengine's WEIGHT_INITIALIZERS (idempotent)."""
    if WEIGHT_INITIALIZERS.module_dict.get('StrictPretrained') is not StrictPretrainedInit:
        WEIGHT_INITIALIZERS.register_module(name='StrictPretrained', module=StrictPretrainedInit)
