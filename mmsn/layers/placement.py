"""Where SW goes in a ResNet: the papers' placements of SW layers by name, as norm paths.

Torch-free tables, below both the checkpoint converter and ``SWResNet``
(``mmsn/mm/backbones.py``), which name the same layers.
"""
from typing import List, Sequence, Union

#: Blocks per stage of the ResNet depths mmdet and mmseg build.
_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                 152: (3, 8, 36, 3)}


def _imagenet_placement(depth: int) -> List[str]:
    # The SW release's ResNet-50 (7 layers): the stem and the 3x3-conv norm of every
    # odd-indexed block of stages 1-3. The SW paper's text counts "the 1st and every 6th
    # layer" globally, which would pick even-indexed blocks of stages 2-3; the release's
    # checkpoints are what users load, so their placement is the one named here.
    return ['norm1'] + [f'layer{stage + 1}.{block}.norm2'
                        for stage, blocks in enumerate(_STAGE_BLOCKS[depth][:3])
                        for block in range(1, blocks, 2)]


def _segmentation_placement(depth: int) -> List[str]:
    # SW paper, appendix B (ADE20K and Cityscapes): the stem and the 3x3-conv norm of every
    # block, not in the 2048-channel stage: 14 layers in ResNet-50.
    return ['norm1'] + [f'layer{stage + 1}.{block}.norm2'
                        for stage, blocks in enumerate(_STAGE_BLOCKS[depth][:3])
                        for block in range(blocks)]


#: The papers' placements by name; each maps a ResNet depth to norm paths.
SW_PLACEMENTS = {'imagenet': _imagenet_placement, 'segmentation': _segmentation_placement}


def resolve_placement(sw_layers: Union[str, Sequence[str]], depth: int) -> List[str]:
    """Norm paths (``'norm1'`` = stem, ``'layer2.1.norm2'``, ``'layer3.0.downsample.1'``)
    of a placement name or an explicit list."""
    if isinstance(sw_layers, str):
        if sw_layers not in SW_PLACEMENTS:
            raise ValueError(f'sw_layers: expected one of {sorted(SW_PLACEMENTS)} or a list of '
                             f'norm paths, got {sw_layers!r}')
        if depth not in _STAGE_BLOCKS:
            raise ValueError(f'depth: expected one of {sorted(_STAGE_BLOCKS)} for the '
                             f'{sw_layers!r} placement, got {depth!r}')
        return SW_PLACEMENTS[sw_layers](depth)
    paths = list(sw_layers)
    if not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(f'sw_layers: expected a placement name or a non-empty list of norm '
                         f'paths, got {sw_layers!r}')
    return paths
