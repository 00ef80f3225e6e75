"""ONNX export of mmseg segmentors and mmdet detectors (backbone and neck) with SN and SW layers.

What is exported, from a tensor that the model's ``data_preprocessor`` has already made
(normalized, channel order fixed, padded), ``(N, 3, H, W)`` float32, named ``input``:

* a segmentor (mmseg ``EncoderDecoder``, ``CascadeEncoderDecoder``): its segmentation logits,
  ``seg_logits`` ``(N, num_classes, H, W)``: the decode head's output resized to the input
  (bilinear, the head's ``align_corners``), as mmseg's whole-image inference and mmdeploy
  compute them; argmax, cropping of padding and ``slide`` inference stay outside the graph;
* a detector (mmdet): ``extract_feat``, the backbone and neck, as ``feat0``, ``feat1``, ...
  (one per feature map; e.g. the FPN levels).

SN and SW export as standard ONNX operators only: their forward is forced onto the PyTorch
reference (``mmsn.ops.use_backend('torch')``), whatever the device, so no ``torch.ops.mmsn``
kernel reaches the trace; with ``fold_hard`` the layers whose ratios are one-hot are first
folded by :func:`mmsn.deploy.deploy_hard_switchable` (into the preceding conv, an affine map,
or the statistics they use). Sparse SN's eval-mode ratios are computed once and exported as
constants. After the export the file is checked (``onnx.checker``, no node outside the
standard ``ai.onnx`` domain) and, unless told not to, run in onnxruntime on random inputs and
compared with PyTorch (float32 on the CPU).

Two exporters (``exporter``):

* ``'torchscript'`` (default): ``torch.onnx.export(..., dynamo=False)``. About 2 s for the
  demo models on 2 CPU cores where the dynamo exporter takes 14-24 s. Deprecated since torch
  2.9 (still in 2.13). Two faults of its output are repaired before the file is checked (see
  :func:`repair_torchscript_graph`). It refuses mmseg's PSPHead pooling wherever an SW
  layer precedes it or its bins do not divide the feature size.
* ``'dynamo'``: ``torch.onnx.export(..., dynamo=True)`` (needs onnxscript): the exporter torch
  recommends; exports PSPHead (at a fixed size) too.

What raises :class:`ValueError` before the exporter is called (naming the layer and the
option): SW with ``method='eigh'`` that the forward runs (``torch.linalg.eigh`` has no ONNX
operator; unless ``fold_hard`` folds the layer away), and dynamic shapes with adaptive
pooling to a grid (PSPHead). What
raises :class:`OnnxExportError`: a failure of the exporter itself (its first line, and what to
try), a node in a custom domain, onnxruntime failing or computing outside the tolerance.
"""
import contextlib
import os
import os.path as osp
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import SparseSwitchNorm2d, SwitchableLayer, SwitchWhiten2d
from .onnx_checks import (DEFAULT_ATOL, DEFAULT_RTOL, INPUT_NAME, Comparison, OnnxExportError,
                          as_tuple, check_standard_domains, compare_with_onnxruntime, device_of,
                          repair_torchscript_graph, require)

#: the exporters: torch.onnx.export with dynamo=False and dynamo=True
EXPORTERS = ('torchscript', 'dynamo')
#: opset used when none is given: 17 (ONNX 1.12) for the torchscript exporter, what
#: TensorRT 8.6 and onnxruntime >= 1.12 read; the dynamo exporter writes 18 and newer
DEFAULT_OPSET = {'torchscript': 17, 'dynamo': 18}
#: the opsets each exporter writes (torch 2.13)
OPSET_RANGE = {'torchscript': (13, 20), 'dynamo': (18, 23)}
#: with dynamic axes the file is also run at (batch + 1, height + 32, width + 32): a size
#: baked into the graph shows there, and 32 keeps every ResNet/FPN stride whole
DYNAMIC_CHECK_GROWTH = (1, 32, 32)


@dataclass
class ExportReport:
    """What :func:`export_module` wrote and measured.

    Attributes:
        path (str): the ONNX file.
        what (str): what the graph computes.
        input_shape (tuple): the example input's shape.
        output_names (list[str]): the graph's outputs.
        exporter (str): 'torchscript' or 'dynamo'.
        opset (int): the ai.onnx opset.
        dynamic (bool): batch, height and width are dynamic.
        folded (dict): ``{layer: what it became}`` from ``fold_hard``.
        switchable_layers (int): SN/SW layers left in the graph (reference composition).
        comparisons (dict): ``{input shape: Comparison}`` (onnxruntime against PyTorch);
            empty when not verified.
        atol, rtol (float): the tolerance the comparison used.
    """

    path: str
    what: str
    input_shape: Tuple[int, ...]
    output_names: List[str]
    exporter: str
    opset: int
    dynamic: bool
    folded: Dict[str, str] = field(default_factory=dict)
    switchable_layers: int = 0
    comparisons: Dict[Tuple[int, ...], Comparison] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def lines(self) -> List[str]:
        """The report as lines for a terminal."""
        def sizes(shape):
            return 'x'.join(map(str, shape))

        axes = ', dynamic batch/height/width' if self.dynamic else ''
        lines = [f'wrote {self.path}: {self.what}, {self.exporter} exporter, opset '
                 f'{self.opset}, input {sizes(self.input_shape)}{axes}, outputs '
                 f'{", ".join(self.output_names)}',
                 f'SN/SW layers: {self.switchable_layers} as the reference composition, '
                 f'{len(self.folded)} folded (hard ratios)']
        lines += [f'  {layer}: {change}' for layer, change in self.folded.items()]
        if self.comparisons:
            diffs = ', '.join(f'{c.max_abs_diff:.2e} at {sizes(shape)} (outputs up to '
                              f'{c.max_abs_output:.3g})' for shape, c in self.comparisons.items())
            lines.append(f'onnxruntime vs PyTorch (float32, CPU): max abs diff {diffs}; '
                         f'tolerance atol {self.atol:g} + rtol {self.rtol:g}')
        else:
            lines.append('not verified with onnxruntime')
        return lines


# ---------------------------------------------------------------------------------------------
# the model: config, weights, what is exported


def load_config(config: str, cfg_options: Optional[dict] = None):
    """An mmengine Config as mmsn's tools read it: dicts inherited from mmsn's shipped configs
    take the config's scope, then ``cfg_options`` are merged."""
    from mmengine.config import Config
    from .launch import apply_config_options
    if not osp.isfile(config):
        raise FileNotFoundError(f'config: expected a config file, got {config!r}, which does '
                                'not exist')
    cfg = Config.fromfile(config)
    apply_config_options(cfg, cfg_options)
    return cfg


def _check_checkpoint_path(checkpoint: str) -> None:
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint: expected a checkpoint file, got {checkpoint!r}, '
                                'which does not exist')


def load_weights(model: nn.Module, checkpoint: str, trusted: bool = False) -> None:
    """Loads a checkpoint file into ``model`` through mmsn's safe loader
    (:func:`mmsn.checkpoint.load_checkpoint_file`: ``weights_only``, damage detected before
    anything is unpickled).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no state dict, or none of some of the model's weights (the
            export would carry random values there).
        mmsn.checkpoint.DamagedCheckpointError, UntrustedCheckpointError: as the loader says.
    """
    from ..checkpoint import load_checkpoint_file
    _check_checkpoint_path(checkpoint)
    loaded = load_checkpoint_file(checkpoint, map_location='cpu', trusted=trusted)
    state = loaded.get('state_dict', loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f'checkpoint: expected a state dict (or a dict with "state_dict") in '
                         f'{checkpoint}, got {type(loaded).__name__}')
    # as mmengine's load_checkpoint: keys saved from a DistributedDataParallel lose 'module.';
    # the version metadata stays (the layers migrate old checkpoints by it)
    revised = OrderedDict((key[len('module.'):] if key.startswith('module.') else key, value)
                          for key, value in state.items())
    revised._metadata = getattr(state, '_metadata', OrderedDict())
    result = model.load_state_dict(revised, strict=False)
    if result.missing_keys:
        shown = ', '.join(result.missing_keys[:5])
        more = f' and {len(result.missing_keys) - 5} more' if len(result.missing_keys) > 5 else ''
        raise ValueError(f'checkpoint: expected weights for every parameter and buffer of the '
                         f'{type(model).__name__} the config builds, got none in {checkpoint} '
                         f'for {shown}{more}; is it a checkpoint of this config?')
    if result.unexpected_keys:
        warnings.warn(f'checkpoint: {len(result.unexpected_keys)} entries of {checkpoint} are '
                      f'not in the model and were ignored ({", ".join(result.unexpected_keys[:5])}'
                      f'{", ..." if len(result.unexpected_keys) > 5 else ""})', stacklevel=2)


def build_model(cfg, checkpoint: Optional[str] = None, device: str = 'cpu',
                trust_checkpoint: bool = False) -> nn.Module:
    """The model of an mmdet or mmseg config, with the checkpoint's weights (None: random
    initialisation, with a warning), on ``device``, in eval mode."""
    from mmengine.registry import MODELS, init_default_scope
    scope = cfg.get('default_scope')
    if not scope:
        raise ValueError('config: expected a default_scope (mmseg or mmdet, as their '
                         'default_runtime sets it), got none')
    device = _check_device(device)
    init_default_scope(scope)
    model = MODELS.build(cfg.model)
    if checkpoint is None:
        warnings.warn('checkpoint: none given; exporting randomly initialised weights',
                      stacklevel=2)
    else:
        load_weights(model, checkpoint, trusted=trust_checkpoint)
    return model.to(device).eval()


def _derives_from(model: nn.Module, module: str, name: str) -> bool:
    # by name: the model's package is imported already, the other one need not be
    return any(cls.__module__ == module and cls.__name__ == name for cls in type(model).__mro__)


class SegmentorLogits(nn.Module):
    """A segmentor's logits at the input's size: the decode head(s) on the backbone's (and
    neck's) features, resized bilinearly with the head's ``align_corners``, as mmseg's
    whole-image inference does before postprocessing.

    Args:
        segmentor (BaseSegmentor): an mmseg ``EncoderDecoder`` or ``CascadeEncoderDecoder``.
    """

    output_names = ('seg_logits',)
    #: what the layer names in messages leave out: they name the model's own paths
    model_prefix = 'segmentor.'

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs: Tensor) -> Tensor:
        logits = self.segmentor._forward(inputs)
        return F.interpolate(logits, size=inputs.shape[2:], mode='bilinear',
                             align_corners=getattr(self.segmentor, 'align_corners', False))

    @staticmethod
    def output_axes(name: str) -> Dict[int, str]:
        """Dynamic axes of an output: the logits have the input's height and width."""
        return {0: 'batch', 2: 'height', 3: 'width'}


class DetectorFeatures(nn.Module):
    """A detector's backbone and neck (``extract_feat``): one output per feature map.

    Args:
        detector (BaseDetector): an mmdet detector.
    """

    output_names = None  # one per feature map: known once the model has run
    model_prefix = 'detector.'

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, inputs: Tensor) -> Tuple[Tensor, ...]:
        return as_tuple(self.detector.extract_feat(inputs))


def wrap_for_export(model: nn.Module) -> Tuple[nn.Module, str]:
    """The part of ``model`` that is exported, as a module of one image tensor, and what it
    computes in words.

    Raises:
        ValueError: ``model`` is neither an mmseg segmentor nor an mmdet detector.
    """
    if _derives_from(model, 'mmseg.models.segmentors.base', 'BaseSegmentor'):
        if (getattr(model, 'test_cfg', None) or {}).get('mode') == 'slide':
            warnings.warn('model.test_cfg.mode: the config infers by sliding windows; the '
                          'export computes the whole image at once (as mode="whole")',
                          stacklevel=2)
        return SegmentorLogits(model), f'{type(model).__name__} segmentation logits'
    if _derives_from(model, 'mmdet.models.detectors.base', 'BaseDetector'):
        return DetectorFeatures(model), f'{type(model).__name__} backbone and neck features'
    raise ValueError(f'model: expected an mmseg segmentor (BaseSegmentor) or an mmdet detector '
                     f'(BaseDetector), got {type(model).__name__}')


# ---------------------------------------------------------------------------------------------
# the checks before and after the exporter


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f'device: expected a torch device such as "cpu" or "cuda:0", got '
                         f'{device!r} ({error})') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device: expected an available device, got {str(device)!r} and '
                         'torch.cuda.is_available() is False')
    return device


def _check_options(shape: Sequence[int], batch: int, exporter: str,
                   opset: Optional[int]) -> int:
    """Checks the export options; returns the opset to use."""
    if (len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                   for s in shape)):
        raise ValueError(f'shape: expected two positive ints (height, width), got {shape!r}')
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f'batch: expected a positive int, got {batch!r}')
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter: expected one of {EXPORTERS}, got {exporter!r}')
    low, high = OPSET_RANGE[exporter]
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f'opset: expected an int from {low} to {high} for the {exporter} '
                         f'exporter, got {opset!r}')
    return opset


def _model_path(module: nn.Module, name: str) -> str:
    """A submodule's name as the wrapped model names it (see ``model_prefix``)."""
    prefix = getattr(module, 'model_prefix', '')
    return (name[len(prefix):] if prefix and name.startswith(prefix) else name) or \
        '(the module)'


def unexportable_layers(module: nn.Module,
                        used: Optional[Sequence[nn.Module]] = None) -> List[str]:
    """The SN/SW layers of ``module`` that neither exporter can write as standard ONNX
    operators, each as 'path (what): why; what to do'.

    Args:
        module (nn.Module): the module to export.
        used (list[nn.Module], optional): only these layers count (those the exported
            forward runs: a detector's heads are not exported). Defaults to all.
    """
    used_ids = None if used is None else {id(layer) for layer in used}
    problems = []
    for name, layer in module.named_modules():
        if not isinstance(layer, SwitchWhiten2d) or (used_ids is not None
                                                     and id(layer) not in used_ids):
            continue
        what = f'{_model_path(module, name)} ({type(layer).__name__}'
        if layer.method == 'eigh':
            problems.append(
                f"{what}, method='eigh'): torch.linalg.eigh has no ONNX operator; build the "
                "layer with method='newton' (the paper's iteration, T steps: not the same "
                'numbers as eigh), or fold it with fold_hard / --fold-hard if its ratios are '
                'one-hot on BW or BN')
    return problems


def check_exportable(module: nn.Module, used: Optional[Sequence[nn.Module]] = None) -> None:
    """Raises ValueError naming every SN/SW layer of ``module`` that cannot export (see
    :func:`unexportable_layers`), before the exporter runs."""
    problems = unexportable_layers(module, used)
    if problems:
        raise ValueError('model: expected SN/SW layers that export to standard ONNX '
                         f'operators, got {len(problems)} that do not:\n  '
                         + '\n  '.join(problems))


#: pooling to a fixed grid: its windows follow the input size, which an exported graph
#: cannot (mmseg's PSPHead: bins of 1, 2, 3 and 6)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def check_dynamic_shapes(module: nn.Module, used: Optional[Sequence[nn.Module]] = None) -> None:
    """Raises ValueError naming the modules that keep ``module`` from exporting with dynamic
    height and width: adaptive pooling to a grid larger than 1x1. The torchscript exporter
    refuses it; the dynamo exporter bakes the export size's windows into the graph, which
    then fails (or computes something else) at other sizes."""
    used_ids = None if used is None else {id(layer) for layer in used}
    fixed = []
    for name, layer in module.named_modules():
        if isinstance(layer, _ADAPTIVE_POOLS) and (used_ids is None or id(layer) in used_ids):
            sizes = layer.output_size if isinstance(layer.output_size, tuple) else (
                layer.output_size,)
            if any(size not in (1, None) for size in sizes):
                fixed.append(f'{_model_path(module, name)} ({type(layer).__name__}, '
                             f'output_size={layer.output_size})')
    if fixed:
        raise ValueError('dynamic: expected a model whose graph follows the input size, got '
                         f'pooling to fixed grids in {", ".join(fixed)}; export at the size '
                         'of use without dynamic shapes (--dynamic), with the dynamo exporter '
                         'where the torchscript one refuses the size')


def _modules_run(module: nn.Module, inputs: Tensor) -> Tuple[Tuple[Tensor, ...], List[nn.Module]]:
    """``module``'s outputs on ``inputs`` and the submodules its forward ran."""
    ran = []
    handles = [sub.register_forward_hook(lambda layer, args, out: ran.append(layer))
               for sub in module.modules()]
    try:
        outputs = as_tuple(module(inputs))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, ran


# ---------------------------------------------------------------------------------------------
# the export


@contextlib.contextmanager
def _constant_sparse_ratios(module: nn.Module):
    """Inside the block, every SSN layer of ``module`` mixes with its current ratios as
    constants. Sparsestmax decides on the values of the ratio logits in Python (``item()``,
    comparisons), which torch.export cannot trace; in eval mode the ratios depend on the
    parameters alone, so the graph holds exactly what the layer computes."""
    layers = [layer for layer in module.modules() if isinstance(layer, SparseSwitchNorm2d)]
    try:
        for layer in layers:
            with torch.no_grad():
                mean, var = (ratio.detach().clone() for ratio in layer.ratios())
            # an instance attribute shadows the method, until it is removed below
            layer.ratio_inputs = (lambda mean=mean, var=var: (mean, var))
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop('ratio_inputs', None)


def _run_exporter(module: nn.Module, example: Tensor, path: str, output_names: List[str],
                  output_axes, dynamic: bool, exporter: str, opset: int) -> None:
    if exporter == 'torchscript':
        axes = None
        if dynamic:
            axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
            axes.update((name, output_axes(name)) for name in output_names)
        with warnings.catch_warnings():
            # chosen knowingly (see the module docstring); what the trace bakes in is caught
            # by the comparison with onnxruntime, at a second size too with dynamic axes
            warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning)
            torch.onnx.export(module, (example,), path, dynamo=False, input_names=[INPUT_NAME],
                              output_names=output_names, opset_version=opset,
                              dynamic_axes=axes, do_constant_folding=True)
        import onnx
        model = onnx.load(path)
        repair_torchscript_graph(model)
        onnx.save(model, path)
    else:
        shapes = None
        if dynamic:
            Dim = torch.export.Dim
            shapes = ({0: Dim('batch'), 2: Dim('height'), 3: Dim('width')},)
        torch.onnx.export(module, (example,), path, dynamo=True, input_names=[INPUT_NAME],
                          output_names=output_names, opset_version=opset,
                          dynamic_shapes=shapes, external_data=False, verbose=False)


def _exporter_failure(exporter: str, error: Exception) -> str:
    """What to tell about an exporter's error: its first line, and what to try."""
    lines = str(error).strip().splitlines()
    message = f'the {exporter} exporter failed: {type(error).__name__}: ' + (
        lines[0] if lines else '')
    if 'adaptive_avg_pool2d' in str(error) and exporter == 'torchscript':
        message += ('. It writes pooling to fixed bins (mmseg\'s PSPHead) only where the bins '
                    'divide a feature size it knows, which SW layers hide from it; try '
                    "exporter='dynamo' (--exporter dynamo)")
    return message


def export_module(module: nn.Module, out: str, shape: Sequence[int] = (512, 512),
                  batch: int = 1, dynamic: bool = False, exporter: str = 'torchscript',
                  opset: Optional[int] = None, verify: bool = True, atol: float = DEFAULT_ATOL,
                  rtol: float = DEFAULT_RTOL, what: Optional[str] = None) -> ExportReport:
    """Exports a module of one ``(N, 3, H, W)`` image tensor (e.g. from
    :func:`wrap_for_export`) to ``out`` and checks the file.

    The module is put in eval mode and traced where its parameters are, with SN/SW on the
    PyTorch reference (never a ``torch.ops.mmsn`` kernel). The comparison runs it on the CPU
    (float32, as onnxruntime does), and puts it back after.

    Args:
        module (nn.Module): takes the image tensor, returns a tensor or a tuple of them.
        out (str): the ONNX file to write.
        shape (tuple[int, int]): the example input's height and width. Defaults to 512x512.
        batch (int): the example input's batch size. Defaults to 1.
        dynamic (bool): make batch, height and width dynamic (then also compared at
            ``DYNAMIC_CHECK_GROWTH`` more). Defaults to False.
        exporter (str): 'torchscript' (default) or 'dynamo'.
        opset (int, optional): ai.onnx opset. Defaults to ``DEFAULT_OPSET[exporter]``.
        verify (bool): compare onnxruntime with PyTorch. Defaults to True.
        atol, rtol (float): the comparison's tolerance.
        what (str, optional): what the module computes, for the report.

    Returns:
        ExportReport: what was written and measured.

    Raises:
        ValueError: an option, or a layer that the forward runs, cannot export (named
            before the exporter runs).
        OnnxExportError: the exporter failed, or the file has custom-domain nodes or
            differs from PyTorch.
    """
    from ..ops import use_backend
    opset = _check_options(tuple(shape), batch, exporter, opset)
    onnx = require('onnx', 'checking the exported file')
    if exporter == 'dynamo':
        require('onnxscript', 'the dynamo exporter')
    if verify:
        require('onnxruntime', 'verifying the export (or pass verify=False / --no-verify)')
    module.eval()
    device = device_of(module)
    # (its own generator: the caller's random state is left as it was)
    example = torch.randn((batch, 3) + tuple(shape),
                          generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), use_backend('torch'):
        outputs, used = _modules_run(module, example)
    check_exportable(module, used)
    if dynamic:
        check_dynamic_shapes(module, used)
    output_names = list(getattr(module, 'output_names', None) or
                        (f'feat{index}' for index in range(len(outputs))))
    output_axes = getattr(module, 'output_axes', None) or (
        lambda name: {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'})
    directory = osp.dirname(osp.abspath(out))
    os.makedirs(directory, exist_ok=True)
    with torch.no_grad(), use_backend('torch'), _constant_sparse_ratios(module):
        try:
            _run_exporter(module, example, out, output_names, output_axes, dynamic, exporter,
                          opset)
        except Exception as error:
            raise OnnxExportError(_exporter_failure(exporter, error)) from error
    try:
        onnx.checker.check_model(out, full_check=True)
    except Exception as error:  # onnx's ValidationError, or its shape inference's error
        raise OnnxExportError(f'{out}: onnx.checker refuses it: {error}') from error
    check_standard_domains(onnx.load(out), out)
    report = ExportReport(
        path=out, what=what or type(module).__name__, input_shape=tuple(example.shape),
        output_names=output_names, exporter=exporter, opset=opset, dynamic=dynamic,
        switchable_layers=len({id(m) for m in used if isinstance(m, SwitchableLayer)}),
        atol=atol, rtol=rtol)
    if verify:
        shapes = [tuple(example.shape)]
        if dynamic:
            grown_batch, grown_height, grown_width = (
                size + growth for size, growth in zip((batch,) + tuple(shape),
                                                      DYNAMIC_CHECK_GROWTH))
            shapes.append((grown_batch, 3, grown_height, grown_width))
        try:
            module.cpu()
            report.comparisons = compare_with_onnxruntime(out, module, shapes, atol, rtol)
        finally:
            module.to(device)
    return report


def export_model(model: nn.Module, out: str, fold_hard: bool = False,
                 **options) -> ExportReport:
    """Exports an mmseg segmentor's logits or an mmdet detector's backbone and neck (see
    :func:`wrap_for_export`) with :func:`export_module`.

    Args:
        model (nn.Module): the built model (e.g. :func:`build_model`).
        out (str): the ONNX file to write.
        fold_hard (bool): first rewrite the SN/SW layers with one-hot ratios
            (:func:`mmsn.deploy.deploy_hard_switchable`; in place). Defaults to False.
        **options: as for :func:`export_module` (shape, batch, dynamic, exporter, opset,
            verify, atol, rtol).
    """
    module, what = wrap_for_export(model)
    model.eval()
    folded = {}
    if fold_hard:
        from ..deploy import deploy_hard_switchable
        folded = deploy_hard_switchable(model)
        if not folded:
            warnings.warn('fold_hard: no SN/SW layer has one-hot ratios (mmsn-harden-ratios '
                          'makes them so); every layer exports as the reference composition',
                          stacklevel=2)
    report = export_module(module, out, what=what, **options)
    report.folded = folded
    return report


def export_onnx(config: str, checkpoint: Optional[str], out: str,
                cfg_options: Optional[dict] = None, device: str = 'cpu',
                trust_checkpoint: bool = False, fold_hard: bool = False,
                **options) -> ExportReport:
    """Builds the model of an mmdet or mmseg config, loads the checkpoint (None: random
    weights, with a warning) and exports it with :func:`export_model`.

    Args:
        config (str): the config file.
        checkpoint (str, optional): the checkpoint file.
        out (str): the ONNX file to write.
        cfg_options (dict, optional): config overrides (``--cfg-options``).
        device (str): where the model is built and traced. Defaults to 'cpu'.
        trust_checkpoint (bool): allow a checkpoint that holds more than weights (runs code
            from it; see :mod:`mmsn.checkpoint`). Defaults to False.
        fold_hard (bool): fold the layers with one-hot ratios first. Defaults to False.
        **options: as for :func:`export_module`.
    """
    # the options and the checkpoint's path first: named before the model is built
    _check_options(tuple(options.get('shape', (512, 512))), options.get('batch', 1),
                   options.get('exporter', 'torchscript'), options.get('opset'))
    _check_device(device)
    if checkpoint is not None:
        _check_checkpoint_path(checkpoint)
    cfg = load_config(config, cfg_options)
    model = build_model(cfg, checkpoint, device=device, trust_checkpoint=trust_checkpoint)
    return export_model(model, out, fold_hard=fold_hard, **options)
