"""The ONNX file after an export: standard operators only, two repairs of the torchscript
exporter's output, and onnxruntime against PyTorch (``onnx_export.py`` writes the file)."""
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

#: node domains of the standard operators
STANDARD_DOMAINS = ('', 'ai.onnx')
#: onnxruntime against PyTorch, elementwise ``|ort - torch| <= atol + rtol * |torch|``. The
#: demo models differ by at most 7e-6, ResNet-50 configs at 512x512 by 3e-5 (float32, both on
#: the CPU; docs/onnx.md).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
#: the input's name in the graph
INPUT_NAME = 'input'


class OnnxExportError(RuntimeError):
    """The exporter failed on something no check before it foresaw, or its file failed a
    check after it: a node outside the standard domains, or onnxruntime computes something
    else than PyTorch (the file is left in place for inspection)."""


@dataclass
class Comparison:
    """onnxruntime against PyTorch on one input, over all outputs.

    Attributes:
        max_abs_diff (float): max ``|onnxruntime - PyTorch|``.
        max_abs_output (float): max ``|PyTorch|``: the scale the difference is relative to.
    """

    max_abs_diff: float
    max_abs_output: float


def require(module: str, purpose: str):
    """Imports an optional package of the ``onnx`` extra, or says how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f'{module} is needed for {purpose}: pip install "mmsn[onnx]" '
                          f'(or pip install {module})') from error


def _graphs(graph):
    """``graph`` and every subgraph inside it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField('g'):
                yield from _graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graphs(subgraph)


def custom_domain_nodes(model) -> List[str]:
    """``'domain::op_type'`` of every node (subgraphs and functions included) outside the
    standard ``ai.onnx`` domain, sorted, each once."""
    nodes = [node for graph in _graphs(model.graph) for node in graph.node]
    nodes += [node for function in model.functions for node in function.node]
    return sorted({f'{node.domain}::{node.op_type}' for node in nodes
                   if node.domain not in STANDARD_DOMAINS})


def check_standard_domains(model, path: str = 'the model') -> None:
    """Raises :class:`OnnxExportError` listing the nodes of ``model`` (an ONNX ModelProto)
    outside the standard domain: custom ops (``torch.ops.mmsn`` kernels, mmcv ops) that
    a plain ONNX runtime cannot run."""
    custom = custom_domain_nodes(model)
    if custom:
        raise OnnxExportError(f'{path}: expected only standard ONNX operators (domain '
                              f'ai.onnx), got nodes of custom domains: {", ".join(custom)}')


def repair_torchscript_graph(model) -> None:
    """Repairs, in place, the two faults of the torchscript exporter's output (torch 2.13)
    that keep onnxruntime from loading or running it:

    * ``Identity`` nodes that copy an initializer (constant folding leaves them): onnxruntime
      1.32's EliminateIdentity pass rejects the graph at load time ("Node input ... is not a
      graph input, initializer, or output of a previous node"). Their consumers read the
      initializer instead.
    * shape annotations inside subgraphs: ``Tensor.diagonal`` (SW's instance variances)
      exports as an ``If`` whose branch outputs the exporter annotates with symbolic dims of
      unrelated tensors (the logits' class count, the input's height), so with dynamic axes
      two SW layers of different widths claim the same shape and onnxruntime fails reusing a
      buffer ("Shape mismatch attempting to re-use buffer"). They are dropped; onnxruntime
      infers its own.
    """
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    replaced = {}
    kept = []
    for node in graph.node:
        if (node.op_type == 'Identity' and node.domain in STANDARD_DOMAINS
                and node.input[0] in initializers and node.output[0] not in outputs):
            replaced[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    if replaced:
        del graph.node[:]
        graph.node.extend(kept)
        for subgraph in _graphs(graph):  # subgraphs may read outer names
            for node in subgraph.node:
                for index, name in enumerate(node.input):
                    if name in replaced:
                        node.input[index] = replaced[name]
    for subgraph in list(_graphs(graph))[1:]:
        del subgraph.value_info[:]
        for value in subgraph.output:
            value.type.tensor_type.ClearField('shape')


def device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return torch.device('cpu') if tensor is None else tensor.device


def as_tuple(outputs) -> Tuple[Tensor, ...]:
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def compare_with_onnxruntime(path: str, module: nn.Module, shapes: Sequence[Tuple[int, ...]],
                             atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                             seed: int = 1) -> Dict[Tuple[int, ...], Comparison]:
    """Runs the file in onnxruntime (CPU) and ``module`` in PyTorch (where it is, on the
    reference backend) on the same random inputs, one per shape (normal, from ``seed``;
    :func:`export_module` traces an input of seed 0: what a trace bakes in from its input's
    values shows on another).

    Returns:
        dict: ``{shape: Comparison}``.

    Raises:
        OnnxExportError: onnxruntime cannot load or run the file, gives other shapes, or an
            element differs by more than ``atol + rtol * |PyTorch|``.
    """
    from ..ops import use_backend
    ort = require('onnxruntime', 'verifying the export (or pass verify=False / --no-verify)')
    try:
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    except Exception as error:
        raise OnnxExportError(f'{path}: onnxruntime cannot load it: {error}') from error
    device = device_of(module)
    generator = torch.Generator().manual_seed(seed)
    comparisons = {}
    for shape in shapes:
        inputs = torch.randn(shape, generator=generator)
        with torch.no_grad(), use_backend('torch'):
            expected = [t.float().cpu() for t in as_tuple(module(inputs.to(device)))]
        try:
            got = session.run(None, {INPUT_NAME: inputs.numpy()})
        except Exception as error:
            raise OnnxExportError(f'{path}: onnxruntime fails on an input of shape {shape} '
                                  f'(a size baked into the graph?): {error}') from error
        comparison = Comparison(0.0, 0.0)
        for index, (want, have) in enumerate(zip(expected, got)):
            have = torch.from_numpy(have)
            if have.shape != want.shape:
                raise OnnxExportError(f'{path}: output {index} on an input of shape {shape}: '
                                      f'expected shape {tuple(want.shape)} (PyTorch), got '
                                      f'{tuple(have.shape)} from onnxruntime')
            if not want.numel():
                continue
            error = (have - want).abs()
            comparison.max_abs_diff = max(comparison.max_abs_diff, float(error.max()))
            comparison.max_abs_output = max(comparison.max_abs_output, float(want.abs().max()))
            outside = error > atol + rtol * want.abs()  # NaN on either side counts as outside
            outside |= have.isnan() != want.isnan()
            if bool(outside.any()):
                raise OnnxExportError(
                    f'{path}: output {index} on an input of shape {shape}: expected '
                    f'onnxruntime within atol {atol:g} + rtol {rtol:g} of PyTorch, got '
                    f'{int(outside.sum())} elements outside, max abs diff '
                    f'{float(error.max()):.3e}')
        comparisons[tuple(shape)] = comparison
    return comparisons
