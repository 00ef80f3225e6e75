"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any kernel module is imported; the kernels are imported lazily."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

# Under pytest-xdist the workers fill the cores already: each worker, and every process it
# starts, computes on one thread. With torch's default of one thread per core, the workers'
# OpenMP threads spun waiting for each other (half the CPU time went to the system).
if int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')) > 1:
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.fixture(autouse=True)
def _restore_backend():
    """A test that forces a backend (``mmsn.ops.set_backend``) leaves the next one as it
    found it."""
    from mmsn.ops import set_backend
    previous = set_backend(None)
    set_backend(previous)
    yield
    set_backend(previous)


@pytest.fixture
def short_demo_run(tmp_path):
    """``make(max_iters, interval, **options)``: the demo FCN config on a few generated
    images, ``max_iters`` iterations of 2 images, validation and checkpoint every
    ``interval``; returns the Config (``options`` set on it)."""
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmsn.demo.shapes import make_shapes_dataset

    def make(max_iters, interval, num_train=8, num_val=4):
        data_root = str(tmp_path / 'shapes')
        make_shapes_dataset(data_root, num_train=num_train, num_val=num_val)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = Config.fromfile(os.path.join(root, 'configs/demo/fcn_r18-sn_shapes.py'))
        cfg.work_dir = str(tmp_path / 'work')
        # mmengine's visualizer is a per-process singleton by name (mmseg's runtime names it
        # 'visualizer'): a second run in the process would write to the first one's files
        cfg.visualizer.name = f'visualizer_{tmp_path.name}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            cfg[loader].dataset.data_root = data_root + '/'
            cfg[loader].batch_size = 2
        cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                             val_interval=interval)
        cfg.param_scheduler = []
        cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=interval,
                                            by_epoch=False)
        return cfg
    return make
