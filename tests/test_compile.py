"""torch.compile of a small SN + SW model matches eager: forward, parameter gradients and
running statistics, in one graph (no graph break). Under compile the layers use the reference
by default and the registered ``torch.ops.mmsn`` kernels with ``MMSN_BACKEND=triton``; eager
uses the fused kernel path then. The aot_eager backend traces what inductor traces (dynamo +
AOTAutograd) without a C++ build, to keep the suite fast."""
import copy

import pytest
import torch

from mmsn import SwitchNorm2d, SwitchWhiten2d
from mmsn.ops import set_backend


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_compiled_model_matches_eager(backend, monkeypatch):
    check_compiled_model(backend, 'cpu', 'aot_eager', monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='needs a CUDA GPU (run through the device tool)')
@pytest.mark.parametrize('backend', ['torch', 'triton'])
def test_compiled_model_on_the_gpu(backend, monkeypatch):
    """inductor itself, and the kernels compiled for the GPU (no interpreter)."""
    check_compiled_model(backend, 'cuda', 'inductor', monkeypatch)


def check_compiled_model(backend, device, compiler, monkeypatch):
    if backend == 'triton':
        pytest.importorskip('triton')
    set_backend(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), SwitchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1),
                                SwitchWhiten2d(16, num_pergroup=16)).to(device)
    eager = copy.deepcopy(model)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    x = torch.randn(2, 3, 8, 8, device=device)
    # (inductor may reorder float32 sums; aot_eager runs the traced ops as they are)
    tolerance = dict(rtol=1e-4, atol=1e-4) if compiler == 'inductor' else {}
    for step in range(2):
        want, got = eager(x), compiled(x)
        torch.testing.assert_close(got, want, **tolerance)
        want.square().sum().backward()
        got.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        # (the conv bias before a normalization has a gradient of round-off size)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), b in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, msg=name, **tolerance)
    eager.eval()
    compiled.eval()
    torch.testing.assert_close(compiled(x), eager(x), **tolerance)
    uses_kernels = ['mmsn.sn_forward' in g and 'mmsn.sw_forward' in g for g in graphs]
    assert graphs and all(uses_kernels) == (backend == 'triton'), graphs[0]
