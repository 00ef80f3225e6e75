"""The changes importing mmsn makes to other libraries (listed in docs/layers.md, "What importing
mmsn changes"), each where registration alone cannot do it.

Each is narrow: it changes how one check sees SN/SW layers (or how one loader reads files)
and nothing else, and applying it twice changes nothing. None imports mmdet or mmseg: that
waits until a model of theirs is built.
"""
import importlib
import threading
from functools import wraps
from typing import Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import SwitchableLayer

def _reads_norm_eval(train) -> bool:
    code = getattr(train, '__code__', None)
    return code is not None and 'norm_eval' in code.co_names


def _freezes_switchable_layers(train):
    """Wraps a ``train(mode)`` that puts ``_BatchNorm`` in eval under ``self.norm_eval`` so
    that it does the same for SN/SW layers."""

    @wraps(train)
    def wrapped(self, mode: bool = True):
        result = train(self, mode)
        if mode and getattr(self, 'norm_eval', False):
            for module in self.modules():
                if isinstance(module, SwitchableLayer):
                    module.eval()
        return result

    wrapped._mmsn_norm_eval = True
    return wrapped


_CHECKED_CLASSES = set()


def patch_norm_eval(model: nn.Module) -> list:
    """Makes ``norm_eval`` freeze SN/SW layers in the classes of ``model``'s modules whose
    own ``train`` reads ``self.norm_eval`` (mmdet/mmseg ResNet, ResNeXt, HRNet, ResLayer, a
    user's backbone written the same way): their ``train`` only looks for ``_BatchNorm``.

    Runs on every model built through the ``MODELS`` registries (see
    :func:`install_build_hook`); call it yourself on a model built from classes directly.

    Returns:
        list[type]: the classes patched by this call.
    """
    patched = []
    for module in model.modules():
        cls = type(module)
        if cls in _CHECKED_CLASSES:
            continue
        _CHECKED_CLASSES.add(cls)
        for owner in cls.__mro__:
            train = owner.__dict__.get('train')
            if (train is None or getattr(train, '_mmsn_norm_eval', False)
                    or not _reads_norm_eval(train)):
                continue
            owner.train = _freezes_switchable_layers(train)
            patched.append(owner)
    return patched


def _config_type(cfg) -> str:
    kind = cfg.get('type') if hasattr(cfg, 'get') else None
    return kind.rpartition('.')[2] if isinstance(kind, str) else ''


def _build_scope(cfg, registry) -> Optional[str]:
    """The scope whose registry ``build_from_cfg`` will look ``cfg['type']`` up in: a scope
    prefix of the type, else ``_scope_``, else the default scope where the root registry has
    it as a child, else the registry's own (``Registry.switch_scope_and_registry``)."""
    from mmengine.registry import DefaultScope
    kind = cfg.get('type') if hasattr(cfg, 'get') else None
    if isinstance(kind, str) and '.' in kind:
        return kind.split('.')[0]
    scope = cfg.get('_scope_') if hasattr(cfg, 'get') else None
    if scope is None:
        current = DefaultScope.get_current_instance()
        scope = current.scope_name if current is not None else None
    if registry is None:
        return scope
    if scope is not None:
        try:  # as switch_scope_and_registry does: the scope's registry may not exist yet
            importlib.import_module(f'{scope}.registry')
        except ImportError:
            pass
        if registry._get_root_registry()._search_child(scope) is not None:
            return scope
    return registry.scope


class _BuildDepth(threading.local):
    """Nesting depth of model builds in this thread."""
    depth = 0


_building = _BuildDepth()


def _mmsn_build(build_func):
    """Wraps a MODELS build function: registers ``SWResNet`` in mmdet's or mmseg's registry
    the first time a config of that scope asks for it, and applies :func:`patch_norm_eval`
    to every model built."""
    if getattr(build_func, '_mmsn_build', False):
        return build_func

    @wraps(build_func)
    def build(cfg, *args, **kwargs):
        if _config_type(cfg) == 'SWResNet':
            from .backbones import register_backbones
            register_backbones(_build_scope(cfg, kwargs.get('registry')))
        _building.depth += 1
        try:
            model = build_func(cfg, *args, **kwargs)
        finally:
            _building.depth -= 1
        # Only the outermost build walks the model: a detector builds its backbone, neck and
        # heads through here too, and their modules are all in the detector's.
        if _building.depth == 0 and isinstance(model, nn.Module):
            patch_norm_eval(model)
        return model

    build._mmsn_build = True
    return build


def install_build_hook() -> None:
    """Wraps the build function of mmengine's root ``MODELS`` and of its descendants that
    exist now (mmdet's and mmseg's, if imported already); registries created later copy the
    root's function. Only model builds are touched, and only as :func:`_mmsn_build` says."""
    from mmengine.registry import MODELS
    pending = [MODELS]
    while pending:
        registry = pending.pop()
        registry.build_func = _mmsn_build(registry.build_func)
        pending.extend(registry.children.values())


def patch_norm_decay() -> bool:
    """Makes mmengine's ``DefaultOptimWrapperConstructor`` count SN/SW layers as norm layers,
    so ``paramwise_cfg=dict(norm_decay_mult=0.)`` removes weight decay from their scale,
    shift and ratio logits, as the papers train detection and segmentation.

    Returns:
        bool: whether mmengine was found.
    """
    try:
        from mmengine.optim.optimizer import default_constructor
    except ImportError:
        return False
    # The constructor's only use of this name is its `is_norm` isinstance check.
    current = default_constructor._BatchNorm
    if not (isinstance(current, tuple) and SwitchableLayer in current):
        default_constructor._BatchNorm = (_BatchNorm, SwitchableLayer)
    return True


def register_config_package() -> bool:
    """Lets configs inherit mmsn's shipped ones, ``_base_ = 'mmsn::sn/...py'``, as they do
    mmdet's: mmengine resolves ``package::`` only for the packages of its
    ``MODULE2PACKAGE`` table (a new key here, nothing else changed), from
    ``<package>/.mim/configs`` (mmsn's wheel carries its configs there).

    Returns:
        bool: whether mmengine was found.
    """
    try:
        from mmengine.config.utils import MODULE2PACKAGE
    except ImportError:
        return False
    MODULE2PACKAGE.setdefault('mmsn', 'mmsn')
    return True


def install_checkpoint_loader() -> bool:
    """Makes mmengine load local checkpoint files with :func:`mmsn.checkpoint.load_checkpoint_file`:
    always ``weights_only=True``, with exactly the globals mmengine's own checkpoints hold
    (so training checkpoints resume under torch >= 2.6, mmengine issue #1655), everything
    else refused unless the file is trusted by path (``MMSN_TRUSTED_CHECKPOINTS``).

    Returns:
        bool: whether it was installed (mmengine present and torch >= 2.6; older torch keeps
        mmengine's loader, i.e. torch's own default).
    """
    from ..checkpoint import load_checkpoint_file, supports_safe_loading
    if not supports_safe_loading():
        return False
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:
        return False
    CheckpointLoader.register_scheme(prefixes='', loader=load_checkpoint_file, force=True)
    return True
