"""SW on chosen norm layers of the mmdet / mmseg ResNet, without copying the ResNet code.

One ``norm_cfg`` builds every norm of a ResNet alike, but the SW papers whiten only a few
layers and keep BN (or SyncBN) elsewhere. ``SWResNet`` (registered in both the mmdet and the
mmseg ``MODELS``) builds the upstream ResNet with its ``norm_cfg`` and then replaces the
norms named by ``sw_layers`` with layers built from ``sw_cfg``::

    backbone=dict(type='SWResNet', depth=50, norm_cfg=dict(type='SyncBN'),
                  sw_cfg=dict(type='SyncSW', sw_type=2, num_pergroup=16),
                  sw_layers='imagenet')

A replaced norm is renamed as the authors' release names it (``bn1`` -> ``sw1``,
``layer1.1.bn2`` -> ``layer1.1.sw2``), so released SW checkpoints map key for key.
"""
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from ..layers.placement import resolve_placement


def _num_channels(layer: nn.Module, path: str) -> int:
    for attr in ('num_features', 'num_channels'):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    raise ValueError(f'sw_layers: {path!r} is a {type(layer).__name__}, not a norm layer with '
                     f'num_features or num_channels')


def _replace_child(parent: nn.Module, old_name: str, new_name: str, layer: nn.Module) -> None:
    """Swaps a child in place, keeping the order of ``_modules`` (and of the state dict)."""
    if new_name != old_name and new_name in parent._modules:
        raise ValueError(f'sw_layers: {type(parent).__name__} already has a child {new_name!r}')
    parent._modules = type(parent._modules)(
        (new_name, layer) if name == old_name else (name, child)
        for name, child in parent._modules.items())


def replace_norm_layers(model: nn.Module, paths: Sequence[str], norm_cfg: Dict) -> List[str]:
    """Rebuilds the norms at ``paths`` of ``model`` from ``norm_cfg``.

    A path ending in a norm property (``norm1``, ``norm2``, ``norm3`` of a ResNet, its blocks)
    renames the layer after the new type's abbreviation and updates ``<norm>_name``; any
    other path (e.g. ``layer2.0.downsample.1``) keeps its key.

    Returns:
        list[str]: the state-dict names of the new layers.
    """
    from mmcv.cnn import build_norm_layer
    names = []
    for path in paths:
        parent_path, _, attr = path.rpartition('.')
        try:
            parent = model.get_submodule(parent_path)
            old = getattr(parent, attr)
        except AttributeError:
            raise ValueError(f'sw_layers: {path!r} names no module of {type(model).__name__}')
        if not isinstance(old, nn.Module):
            raise ValueError(f'sw_layers: {path!r} is not a module')
        name_attr = f'{attr}_name'
        if hasattr(parent, name_attr):  # a norm property: normK -> <abbr>K
            postfix = attr[len('norm'):]
            new_name, layer = build_norm_layer(norm_cfg, _num_channels(old, path), postfix)
            _replace_child(parent, getattr(parent, name_attr), new_name, layer)
            setattr(parent, name_attr, new_name)
        else:
            new_name, layer = attr, build_norm_layer(norm_cfg, _num_channels(old, path))[1]
            _replace_child(parent, attr, attr, layer)
        names.append(f'{parent_path}.{new_name}' if parent_path else new_name)
    return names


def switchable_whitening_resnet(base: type) -> type:
    """A subclass of the ResNet class ``base`` that puts SW on chosen layers."""

    class SWResNet(base):
        __doc__ = f"""{base.__module__}.{base.__name__} with SW on chosen norm layers.

        Args:
            sw_cfg (dict): config of the SW layers. Defaults to ``dict(type='SW')``.
            sw_layers (str | list[str]): 'imagenet' (the SW release's 7 layers of ResNet-50),
                'segmentation' (the SW paper's 14 layers) or norm paths such as
                ``['norm1', 'layer1.0.norm2']``. Defaults to 'imagenet'.
            *args, **kwargs: as for ``{base.__name__}``; ``norm_cfg`` builds the other norms.
        """

        def __init__(self, *args, sw_cfg: Dict = dict(type='SW'),
                     sw_layers: Union[str, Sequence[str]] = 'imagenet', **kwargs):
            super().__init__(*args, **kwargs)
            paths = resolve_placement(sw_layers, self.depth)
            if getattr(self, 'deep_stem', False) and 'norm1' in paths:
                raise ValueError("sw_layers: the 'norm1' stem path needs the 7x7 stem "
                                 "(deep_stem=False); name the deep stem's norms ('stem.1', "
                                 "'stem.4', 'stem.7') instead")
            self.sw_layer_names = replace_norm_layers(self, paths, sw_cfg)
            self._freeze_stages()  # new layers in frozen stages must be frozen too

    SWResNet.__qualname__ = SWResNet.__name__ = f'SW{base.__name__}'
    return SWResNet


#: The packages whose ResNet ``SWResNet`` extends, by registry scope.
SW_RESNET_SCOPES = ('mmdet', 'mmseg')


def register_backbones(scope: Optional[str] = None) -> None:
    """Registers ``SWResNet`` in the ``MODELS`` of ``scope`` ('mmdet' or 'mmseg'), or of
    both (those installed) when ``scope`` is None. Idempotent.

    Importing mmsn does not call it (it would import mmdet and mmseg): the MODELS build
    hook calls it with the config's scope the first time a config asks for ``SWResNet``.

    Raises:
        ValueError: ``scope`` is another package's: SWResNet extends mmdet's or mmseg's
            ResNet and must know which.
    """
    if scope is not None and scope not in SW_RESNET_SCOPES:
        raise ValueError(f"SWResNet: expected to be built in the 'mmdet' or 'mmseg' scope "
                         f"(default_scope, or _scope_ in its config), got {scope!r}")
    for package in (scope,) if scope else SW_RESNET_SCOPES:
        try:
            registry = __import__(f'{package}.registry', fromlist=['MODELS']).MODELS
            backbones = __import__(f'{package}.models.backbones', fromlist=['ResNet'])
        except ImportError:
            if scope is not None:
                raise
            continue
        registered = registry.module_dict.get('SWResNet')
        if registered is not None and registered.__mro__[1] is backbones.ResNet:
            continue
        registry.register_module(name='SWResNet',
                                 module=switchable_whitening_resnet(backbones.ResNet))
