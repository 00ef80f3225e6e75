"""ONNX export (mmsn.mm.onnx_export, mmsn-export-onnx): the shipped SN and SW configs and every
layer export as standard ONNX operators, and onnxruntime computes what PyTorch computes.

Tolerance: the tool's own, elementwise ``|onnxruntime - PyTorch| <= 1e-4 + 1e-4 * |PyTorch|``
(float32, both on the CPU); the demo models differ by at most 7e-6.
"""
import os.path as osp

import pytest
import torch
from torch import nn

pytest.importorskip('mmseg')
pytest.importorskip('mmdet')
onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from mmsn import (SparseSwitchNorm2d, SwitchNorm2d, SwitchWhiten2d,  # noqa: E402
                  SyncSparseSwitchNorm2d, SyncSwitchNorm, SyncSwitchWhiten2d)
from mmsn.deploy import deploy_hard_switchable  # noqa: E402
from mmsn.hard_ratios import harden_ratios  # noqa: E402
from mmsn.layers import SwitchableLayer  # noqa: E402
from mmsn.mm.onnx_checks import (DEFAULT_ATOL, DEFAULT_RTOL, OnnxExportError,  # noqa: E402
                                 check_standard_domains, compare_with_onnxruntime,
                                 custom_domain_nodes, repair_torchscript_graph)
from mmsn.mm.onnx_export import (build_model, export_model, export_module,  # noqa: E402
                                 export_onnx, load_config, load_weights, wrap_for_export)
from mmsn.tools.export_onnx import main  # noqa: E402

# the models are exported with random weights on purpose
pytestmark = pytest.mark.filterwarnings('ignore:checkpoint. none given:UserWarning')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
FCN_SN = osp.join(ROOT, 'configs/demo/fcn_r18-sn_shapes.py')
MASK_RCNN_SN = osp.join(ROOT, 'configs/demo/mask-rcnn_r18-sn_fpn-sn_shapes.py')
DEEPLAB_SW = osp.join(ROOT, 'configs/sw/deeplabv3_r50-sw-d8_4xb4-80k_ade20k-512x512.py')
PSPNET_SW = osp.join(ROOT, 'configs/sw/pspnet_r50-sw-d8_4xb4-80k_ade20k-512x512.py')
# ResNet-18 for the SW config's ResNet-50 (its SW placement follows the depth: 7 SyncSW
# layers), heads narrowed to match: seconds instead of a minute on 2 cores
SW_R18 = {'model.backbone.depth': 18, 'model.decode_head.in_channels': 512,
          'model.decode_head.channels': 64, 'model.auxiliary_head.in_channels': 256,
          'model.auxiliary_head.channels': 32}


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(out) for out in session.run(None, {'input': inputs.numpy()})]


def assert_close(got, expected):
    torch.testing.assert_close(got, expected, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL)


@torch.no_grad()
def give_trained_statistics(model, seed=0):
    """Ratio logits, running statistics and affine parameters unlike their initial values
    (uniform ratios, zero means, unit variances), as after training."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if not isinstance(layer, SwitchableLayer):
            continue
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name in ('mean_weight', 'var_weight') and getattr(
                    layer, name.replace('weight', 'fixed'), torch.zeros(1)).item():
                continue  # SSN's fixed one-hot probabilities stay as they are
            if name in ('mean_weight', 'var_weight', 'sw_mean_weight', 'sw_var_weight'):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 2)
            elif name in ('weight', 'bias', 'running_mean'):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5
                             + (name == 'weight'))
            elif name == 'running_var':
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 1.5 + 0.5)
            elif name == 'running_cov':
                a = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(a @ a.transpose(-1, -2) / a.shape[-1]
                             + torch.eye(a.shape[-1]))
    return model


def small_net(*norms, channels=32):
    """conv, then (norm, ReLU, conv) per norm."""
    layers = [nn.Conv2d(3, channels, 3, padding=1)]
    for norm in norms:
        layers += [norm, nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    return give_trained_statistics(nn.Sequential(*layers)).eval()


def sparse_sn(radius=0.3, fixed=False):
    """SSN with sparse ratios, or with ratios that reached one-hot and were fixed (their
    probabilities stored in place of the logits, as the SSN release does)."""
    layer = SparseSwitchNorm2d(32)
    layer.radius.fill_(radius)
    if fixed:
        with torch.no_grad():
            layer.mean_weight.copy_(torch.tensor([0.2, 1.0, -0.5]))
            layer.var_weight.copy_(torch.tensor([0.1, -0.3, 0.8]))
        layer.radius.fill_(1.0)  # sparsestmax is one-hot from sqrt(2/3)
        assert layer.fix_one_hot() == (True, True)
    return layer


@pytest.mark.slow
def test_sn_segmentor_config_exports_its_logits(tmp_path):
    model = give_trained_statistics(build_model(load_config(FCN_SN)))
    out = tmp_path / 'fcn.onnx'
    report = export_model(model, str(out), shape=(64, 64))
    assert report.output_names == ['seg_logits'] and report.switchable_layers == 25
    assert report.comparisons[(1, 3, 64, 64)].max_abs_diff < DEFAULT_ATOL
    assert custom_domain_nodes(onnx.load(str(out))) == []
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = wrap_for_export(model)[0](inputs)
    (logits,) = run_onnx(out, inputs)
    assert logits.shape == (1, 4, 64, 64)  # the demo's 4 classes, at the input's size
    assert_close(logits, expected)


@pytest.mark.slow
def test_sw_segmentor_config_exports_with_dynamic_shapes(tmp_path):
    """The shipped SW config (SyncSW in the backbone, SyncBN elsewhere; no process group):
    exported at one size and batch, run at others."""
    model = give_trained_statistics(build_model(load_config(DEEPLAB_SW, SW_R18)))
    assert sum(isinstance(m, SyncSwitchWhiten2d) for m in model.modules()) == 7
    out = tmp_path / 'deeplab.onnx'
    report = export_model(model, str(out), shape=(64, 64), dynamic=True)
    assert set(report.comparisons) == {(1, 3, 64, 64), (2, 3, 96, 96)}
    assert custom_domain_nodes(onnx.load(str(out))) == []
    inputs = torch.randn(3, 3, 80, 48)
    with torch.no_grad():
        expected = wrap_for_export(model)[0](inputs)
    (logits,) = run_onnx(out, inputs)
    assert logits.shape == (3, 150, 80, 48)
    assert_close(logits, expected)


@pytest.mark.slow
def test_sn_detector_exports_backbone_and_neck(tmp_path):
    model = give_trained_statistics(build_model(load_config(MASK_RCNN_SN)))
    out = tmp_path / 'mask-rcnn.onnx'
    report = export_model(model, str(out), shape=(64, 64), dynamic=True)
    assert report.output_names == [f'feat{i}' for i in range(5)]  # the FPN levels
    inputs = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        expected = model.extract_feat(inputs)
    features = run_onnx(out, inputs)
    assert [f.shape for f in features] == [e.shape for e in expected]
    for got, want in zip(features, expected):
        assert_close(got, want)


def export_hardened(model, out):
    """Hardens the ratios of ``model`` and exports it with ``fold_hard``; checks that the
    file computes what the hardened model does. Returns the export report."""
    harden_ratios(model)
    inputs = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = wrap_for_export(model)[0](inputs)
    report = export_model(model, str(out), fold_hard=True, shape=(64, 64))
    assert_close(run_onnx(out, inputs)[0], expected)
    return report


def test_fold_hard_exports_the_folded_layers(tmp_path):
    """Hard ratios (mmsn.deploy.harden_ratios): BN/BN layers fold into their conv, the rest
    keep only the statistics they use; the file computes what the hardened model did."""
    model = give_trained_statistics(build_model(load_config(FCN_SN)))
    with torch.no_grad():
        for index, layer in enumerate(m for m in model.modules() if isinstance(m, SwitchNorm2d)):
            if index % 2:  # every other layer picks BN for both: folds into its conv
                layer.mean_weight.copy_(torch.tensor([0., 0., 5.]))
                layer.var_weight.copy_(torch.tensor([0., 0., 5.]))
    report = export_hardened(model, tmp_path / 'fcn-hard.onnx')
    assert len(report.folded) == 25 and report.switchable_layers == 0
    assert 'folded into the preceding conv' in report.folded.values()


@pytest.mark.parametrize('make_layer', [
    lambda: SwitchNorm2d(32), lambda: SwitchNorm2d(32, using_bn=False),
    lambda: SyncSwitchNorm(32), sparse_sn, lambda: sparse_sn(fixed=True),
    lambda: SyncSparseSwitchNorm2d(32), lambda: SwitchWhiten2d(32, sw_type=2),
    lambda: SwitchWhiten2d(32, sw_type=3), lambda: SwitchWhiten2d(32, sw_type=5),
    lambda: SwitchWhiten2d(32, tie_weight=True), lambda: SwitchWhiten2d(32, affine=False),
    lambda: SyncSwitchWhiten2d(32)],
    ids=['SN', 'SN-IN-LN', 'SyncSN', 'SSN', 'SSN-fixed', 'SyncSSN', 'SW2', 'SW3', 'SW5',
         'SW-tied', 'SW-no-affine', 'SyncSW'])
def test_layers_export_as_standard_operators(tmp_path, make_layer):
    """Eval mode, no process group (the synchronized layers need none there); SW's
    diagonal BN and IN covariances (sw_type=5) as products with the identity, which the
    torchscript exporter writes (it has no diag_embed)."""
    net = small_net(make_layer(), make_layer())
    out = tmp_path / 'net.onnx'
    report = export_module(net, str(out), shape=(16, 12), batch=2, dynamic=True)
    assert set(report.comparisons) == {(2, 3, 16, 12), (3, 3, 48, 44)}
    assert custom_domain_nodes(onnx.load(str(out))) == []


def test_forced_kernels_still_export_the_reference(tmp_path):
    """On a GPU the layers would run mmsn's Triton kernels (torch.ops.mmsn custom ops); here
    the kernels are forced (TRITON_INTERPRET=1 runs them on CPU tensors, tests/conftest.py):
    the export still traces the reference."""
    from mmsn.ops import KERNELS_AVAILABLE, set_backend
    if not KERNELS_AVAILABLE:
        pytest.skip('the kernels need triton and torch >= 2.4')
    set_backend('triton')  # (conftest.py puts the previous setting back)
    out = tmp_path / 'net.onnx'
    export_module(small_net(SwitchNorm2d(32), SwitchWhiten2d(32)), str(out), shape=(8, 8))
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert custom_domain_nodes(onnx.load(str(out))) == [] and 'MatMul' in ops


@pytest.mark.slow
def test_dynamo_exporter_exports_sparse_sn_and_sw_type_5(tmp_path):
    """The dynamo exporter cannot trace sparsestmax, whose eval-mode ratios are exported as
    constants."""
    pytest.importorskip('onnxscript')
    net = small_net(SwitchWhiten2d(32, sw_type=5), sparse_sn())
    out = tmp_path / 'net.onnx'
    report = export_module(net, str(out), shape=(16, 16), dynamic=True, exporter='dynamo')
    assert report.opset == 18 and len(report.comparisons) == 2
    assert custom_domain_nodes(onnx.load(str(out))) == []
    assert 'ratio_inputs' not in vars(net[3])  # the layer's own method again


@pytest.mark.parametrize('layer, exporter, named', [
    (lambda: SwitchWhiten2d(32, method='eigh'), 'torchscript', "method='eigh'"),
    (lambda: SyncSwitchWhiten2d(32, method='eigh'), 'dynamo', "method='eigh'")],
    ids=['SW-eigh-torchscript', 'SyncSW-eigh-dynamo'])
def test_layers_that_cannot_export_are_named_before_the_exporter_runs(
        tmp_path, monkeypatch, layer, exporter, named):
    def exporter_called(*args, **kwargs):
        raise AssertionError('the exporter ran')
    monkeypatch.setattr(torch.onnx, 'export', exporter_called)
    with pytest.raises(ValueError, match=rf"^model: .*\n  4 \(\w+, {named}\)"):
        export_module(small_net(SwitchNorm2d(32), layer()), str(tmp_path / 'net.onnx'),
                      shape=(8, 8), exporter=exporter)


def test_fold_hard_exports_an_eigh_layer_with_hard_batch_ratios(tmp_path):
    """SW by eigh picking BW is a fixed linear map in eval: folded, it exports."""
    net = small_net(SwitchWhiten2d(32, method='eigh'))
    with torch.no_grad():
        net[1].sw_mean_weight.copy_(torch.tensor([5., 0.]))
        net[1].sw_var_weight.copy_(torch.tensor([5., 0.]))
    harden_ratios(net)
    inputs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = net(inputs)
    assert deploy_hard_switchable(net) == {'1': 'folded into the preceding conv'}
    out = tmp_path / 'net.onnx'
    export_module(net, str(out), shape=(8, 8), batch=2)
    assert_close(run_onnx(out, inputs)[0], expected)


@pytest.mark.slow
def test_eigh_sw_config_raises_unless_its_hard_layers_are_folded(tmp_path):
    """SW by eigh in the shipped SW config: named before the exporter runs; once its ratios
    are hard on BW, --fold-hard folds every such layer into its conv and the model exports."""
    model = give_trained_statistics(build_model(load_config(
        DEEPLAB_SW, dict(SW_R18, **{'model.backbone.sw_cfg.method': 'eigh'}))))
    with pytest.raises(ValueError, match=r"^model: .* got 7 .*\n  backbone.sw1 \("
                                         r"SyncSwitchWhiten2d, method='eigh'\)"):
        export_model(model, str(tmp_path / 'deeplab.onnx'), shape=(64, 64))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SwitchWhiten2d):
                layer.sw_mean_weight.copy_(torch.tensor([5., 0.]))
                layer.sw_var_weight.copy_(torch.tensor([5., 0.]))
    report = export_hardened(model, tmp_path / 'deeplab.onnx')
    assert set(report.folded.values()) == {'folded into the preceding conv'}
    assert len(report.folded) == 7 and report.switchable_layers == 0


@pytest.mark.slow
def test_pyramid_pooling_is_named_for_dynamic_shapes_and_the_torchscript_exporter(tmp_path):
    """mmseg's PSPHead pools to fixed bins: no dynamic height and width with either exporter;
    the torchscript exporter refuses it after SW layers (the error says what to try)."""
    model = build_model(load_config(PSPNET_SW, SW_R18))
    out = str(tmp_path / 'pspnet.onnx')
    with pytest.raises(ValueError, match=r'^dynamic: expected .* decode_head.psp_modules.1.0 '
                                         r'\(AdaptiveAvgPool2d, output_size=2\)'):
        export_model(model, out, shape=(64, 64), dynamic=True)
    with pytest.raises(OnnxExportError, match=r"^the torchscript exporter failed: .*"
                                              r"adaptive_avg_pool2d.*exporter='dynamo'"):
        export_model(model, out, shape=(64, 64))


@pytest.mark.parametrize('options, named', [
    (dict(shape=(64,)), 'shape'), (dict(shape=(0, 64)), 'shape'), (dict(batch=0), 'batch'),
    (dict(exporter='onnx'), 'exporter'), (dict(opset=9), 'opset'),
    (dict(exporter='dynamo', opset=17), 'opset')])
def test_invalid_options_are_named(tmp_path, options, named):
    with pytest.raises(ValueError, match=f'^{named}: expected'):
        export_module(small_net(), str(tmp_path / 'net.onnx'), **options)


def test_unavailable_device_and_other_models_are_named(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='^device: expected an available device'):
            export_onnx(FCN_SN, None, str(tmp_path / 'fcn.onnx'), device='cuda')
    with pytest.raises(ValueError, match='^model: expected an mmseg segmentor'):
        export_model(small_net(), str(tmp_path / 'net.onnx'))


def test_custom_domain_nodes_are_refused():
    from onnx import TensorProto, helper
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node('Relu', ['x'], ['y']),
         helper.make_node('SwitchNorm', ['y'], ['z'], domain='mmsn')], 'g',
        [value('x', TensorProto.FLOAT, [1])], [value('z', TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17),
                                                    helper.make_opsetid('mmsn', 1)])
    with pytest.raises(OnnxExportError, match='custom domains: mmsn::SwitchNorm$'):
        check_standard_domains(model)


def test_identity_copies_of_initializers_are_removed():
    """What keeps onnxruntime 1.32 from loading the torchscript exporter's graphs."""
    from onnx import TensorProto, helper, numpy_helper
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node('Identity', ['w'], ['w_copy']),
         helper.make_node('Mul', ['x', 'w_copy'], ['y'])], 'g',
        [value('x', TensorProto.FLOAT, [2])], [value('y', TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(torch.tensor([2., 3.]).numpy(), 'w')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    repair_torchscript_graph(model)
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [('Mul', ['x', 'w'])]
    onnx.checker.check_model(model)


def test_a_file_that_differs_from_pytorch_is_refused(tmp_path):
    net = small_net(SwitchNorm2d(32))
    out = str(tmp_path / 'net.onnx')
    export_module(net, out, shape=(8, 8), verify=False)
    with torch.no_grad():
        net[1].running_mean.add_(1.0)  # the model moves on, the file does not
    with pytest.raises(OnnxExportError, match='expected onnxruntime within atol'):
        compare_with_onnxruntime(out, net, [(1, 3, 8, 8)])


def test_missing_and_foreign_checkpoints_are_named(tmp_path, capsys):
    missing = str(tmp_path / 'missing.pth')
    with pytest.raises(FileNotFoundError, match='^checkpoint: expected a checkpoint file'):
        export_onnx(FCN_SN, missing, str(tmp_path / 'fcn.onnx'))
    assert main([FCN_SN, missing, '--out', str(tmp_path / 'fcn.onnx')]) == 1
    assert f"export_onnx: checkpoint: expected a checkpoint file, got '{missing}'" in \
        capsys.readouterr().err
    model = build_model(load_config(FCN_SN))
    state = model.state_dict()
    foreign = str(tmp_path / 'backbone.pth')
    torch.save({'state_dict': {k: v for k, v in state.items() if k.startswith('backbone.')}},
               foreign)
    with pytest.raises(ValueError, match=r'^checkpoint: expected weights .* for decode_head'):
        load_weights(model, foreign)


@pytest.mark.slow
def test_command_line_exports_a_checkpoint(tmp_path, capsys):
    """mmsn-export-onnx end to end: config and checkpoint in, a file that computes what the
    checkpoint's model computes out."""
    model = give_trained_statistics(build_model(load_config(FCN_SN)), seed=1)
    harden_ratios(model)
    checkpoint = str(tmp_path / 'fcn.pth')
    torch.save({'meta': {'hard_ratios': True}, 'state_dict': model.state_dict()}, checkpoint)
    out = str(tmp_path / 'fcn.onnx')
    assert main([FCN_SN, checkpoint, '--out', out, '--shape', '64', '48', '--dynamic',
                 '--fold-hard', '--cfg-options', 'model.decode_head.align_corners=True']) == 0
    printed = capsys.readouterr().out
    assert f'wrote {out}: EncoderDecoder segmentation logits' in printed
    assert '25 folded' in printed and 'max abs diff' in printed
    model.decode_head.align_corners = model.align_corners = True
    inputs = torch.randn(2, 3, 32, 80)
    with torch.no_grad():
        expected = wrap_for_export(model)[0](inputs)  # the unfolded model of the checkpoint
    assert_close(run_onnx(out, inputs)[0], expected)
