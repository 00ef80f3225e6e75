"""Record the SN/SW layer calls that users make into ``tests/data/norm_calls.json``.

    python tools/analysis_tools/record_norm_calls.py [--out FILE]   # 25 models: minutes
    python tools/analysis_tools/record_norm_calls.py --check        # exit 1 if FILE is stale

What is recorded (``mmsn/norm_calls.py`` describes a record):

* every shipped config family (``configs/sn``, ``configs/sw``, the SN demo configs) and a few
  upstream mmdet/mmseg configs switched with ``--norm SN`` / ``--norm SW``
  (``UPSTREAM``), each built from its config with random initialisation and run on the
  reference path: single-image inference through the model's test path
  (``model.test_step``) and a training step of 2 images (forward and backward), on
  64x64 images. float32 calls are replayed in float16 and bfloat16 too (``--amp``);
* the largest maps users feed, traced on the meta device (no arithmetic): whole-image
  Cityscapes inference at 1024x2048 of every shipped Cityscapes config;
* a layer sweep over the edge values (``sweep()``): N in {1, 2, 8}, L in {0, 1, 49, 3136},
  float64/float32/bfloat16/float16, NCHW and channels_last, SN 1d/2d/3d, SSN,
  ``momentum=None``, ``affine=False``, ``using_bn=False``, SW types 2/3/5 at 16/32/64 channels
  per group, a 3D volume of 1x64x128^3, and SyncSN/SyncSW recorded in a real 2-process
  gloo group (unequal and empty ranks).

``--check`` recomputes the file's fingerprint: the resolved model config of every recorded
model, the mmcv/mmengine/mmdet/mmseg versions, this tool (the sweep, the models, the
image sizes) and ``RECORDS_VERSION``. Code that changes which norm-layer calls a built model
makes (the record format in ``mmsn/norm_calls.py``, the norm switch, the backbones) bumps
``RECORDS_VERSION`` rather than being hashed whole: a refactor or a docstring there does not
call for minutes of re-recording, and ``tests/test_norm_calls.py`` replays every record
through the layers as they are.
"""
import argparse
import contextlib
import hashlib
import json
import os
import os.path as osp
import socket
import sys
import tempfile
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
from mmsn.norm_calls import AMP_DTYPES, CallRecorder, describe, dumps_calls  # noqa: E402
from mmsn.ops import set_backend  # noqa: E402

DEFAULT_OUT = osp.join(ROOT, 'tests', 'data', 'norm_calls.json')
COMMAND = 'python tools/analysis_tools/record_norm_calls.py'
#: upstream configs run under the norm switch (``tools/train.py --norm``): (scope, path, norm)
UPSTREAM = [
    ('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 'SN'),
    ('mmdet', 'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 'SW'),
    ('mmdet', 'retinanet/retinanet_r18_fpn_1x_coco.py', 'SN'),
    ('mmseg', 'fcn/fcn_r50-d8_4xb2-40k_cityscapes-512x1024.py', 'SN'),
    ('mmseg', 'upernet/upernet_r50_4xb2-40k_cityscapes-512x1024.py', 'SN'),
    ('mmseg', 'deeplabv3/deeplabv3_r50b-d8_4xb2-80k_cityscapes-512x1024.py', 'SW'),
]
SOURCES = ('tools/analysis_tools/record_norm_calls.py',)
#: bumped by a change that alters the records of a model (see the module docstring)
RECORDS_VERSION = 1
IMAGE = 64
#: whole-image inference at Cityscapes' full resolution (H, W)
CITYSCAPES = (1024, 2048)


# ----------------------------------------------------------------------------- the models

def shipped_configs():
    """(name, scope) of the shipped configs that build SN/SW layers."""
    found = []
    for folder in ('sn', 'sw', 'demo'):
        for name in sorted(os.listdir(osp.join(ROOT, 'configs', folder))):
            if name.endswith('.py') and (folder != 'demo' or '-sn' in name):
                scope = 'mmdet' if 'rcnn' in name else 'mmseg'
                found.append((f'{folder}/{name}', scope))
    return found


def load_model_config(name: str, scope: str, norm: str = None):
    """The config of one recorded model, as recorded: random init, 64x64 crops."""
    from mmengine.config import Config
    if norm is None:
        cfg = Config.fromfile(osp.join(ROOT, 'configs', name))
    else:
        from mmsn.mm.norm_switch import switch_config_norm
        with tempfile.TemporaryDirectory() as tmp:
            # Config.fromfile('mmdet::...') does not resolve the prefix; a file inheriting
            # it does
            stub = osp.join(tmp, 'upstream.py')
            with open(stub, 'w') as f:
                f.write(f"_base_ = '{scope}::{name}'\n")
            cfg = Config.fromfile(stub)
        switch_config_norm(cfg, norm, pretrained='none')
    cfg.model.pop('pretrained', None)
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None  # no converted checkpoint here: random init
    if scope == 'mmseg':
        cfg.model.data_preprocessor.size = (IMAGE, IMAGE)
    return cfg


def models():
    """(source name, scope, norm or None) of every recorded model."""
    entries = [(name, scope, None) for name, scope in shipped_configs()]
    entries += [(path, scope, norm) for scope, path, norm in UPSTREAM]
    return entries


def model_name(name, norm):
    return name if norm is None else f'{name} --norm {norm}'


def build_model(cfg, scope):
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(scope)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def synthetic_batch(scope, cfg, images, size=IMAGE):
    torch.manual_seed(1)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        head = cfg.model.get('roi_head', {}).get('bbox_head') or cfg.model.bbox_head
        return demo_mm_inputs(batch_size=images, image_shapes=[(3, size, size)] * images,
                              num_items=[3, 2][:images], num_classes=head.num_classes,
                              with_mask=True)
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(images):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, cfg.model.decode_head.num_classes, (1, size, size)))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8) for _ in range(images)]
    return dict(inputs=inputs, data_samples=samples)


@contextlib.contextmanager
def identity_norms():
    """SN/SW layers return their input (shape tracing on the meta device): the ops the
    layers call are replaced; the layers' input checks and the recorder's hook still run."""
    from mmsn.layers import switch_norm, switch_whiten
    saved = switch_norm.switch_norm, switch_whiten.switch_whiten
    switch_norm.switch_norm = switch_whiten.switch_whiten = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        switch_norm.switch_norm, switch_whiten.switch_whiten = saved


def record_model(recorder, name, scope, norm):
    """Inference on one image and a training step of two, on the reference path."""
    cfg = load_model_config(name, scope, norm)
    model = build_model(cfg, scope)
    source = model_name(name, norm)
    model.train()
    with recorder.source(f'{source}:train'):
        batch = synthetic_batch(scope, cfg, 2)
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
    model.eval()
    with recorder.source(f'{source}:inference'), torch.no_grad():
        model.test_step(synthetic_batch(scope, cfg, 1))
    if scope == 'mmseg' and 'cityscapes' in name and norm is None:
        # the whole 1024x2048 image, traced on the meta device
        model = model.to('meta')
        height, width = CITYSCAPES
        metas = [dict(img_shape=CITYSCAPES, ori_shape=CITYSCAPES, pad_shape=CITYSCAPES)]
        with recorder.source(f'{source}:inference {height}x{width}'), torch.no_grad(), \
                identity_norms():
            model.inference(torch.empty(1, 3, height, width, device='meta'), metas)


# ---------------------------------------------------------------------------- the sweep

#: (H, W) for L = 0, 1, 49, 3136
MAPS = {0: (0, 7), 1: (1, 1), 49: (7, 7), 3136: (56, 56)}
ALL_DTYPES = ('float32', 'float16', 'bfloat16', 'float64')
#: (train, input_grad, param_grad): a training step, inference, and a layer kept in eval
#: mode inside a training step (its BN branch from the running statistics, still
#: differentiated)
MODES = {'train': (True, True, True), 'eval': (False, False, False),
         'eval-grad': (False, True, True)}


def _sweep_case(recorder, source, layer, shape, layout='nchw', modes=('train', 'eval'),
                dtypes=ALL_DTYPES):
    memory_format = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last,
                     'channels_last_3d': torch.channels_last_3d}[layout]
    x = torch.empty(shape).to(memory_format=memory_format)
    for mode in modes:
        train, input_grad, param_grad = MODES[mode]
        layer.train(train)
        for p in layer.parameters():
            p.requires_grad_(param_grad)
        with torch.set_grad_enabled(input_grad or param_grad):
            record = describe(layer, x.requires_grad_(input_grad))
        recorder.add(record, f'sweep:{source}', dtypes)


def sweep(recorder):
    """The layer sweep (its synchronized part: ``sync_sweep``). A covering design, not the
    full product (the compile check's budget): every edge value in at least one case for
    SN and for SW at each group size, each dtype and layout and option at a few shapes;
    float16/bfloat16 in NCHW and SW at 16 per group also come from every model."""
    from mmsn import (SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d,
                      SwitchWhiten2d)
    fp32, amp = ('float32',), ('float16', 'bfloat16')
    # SN: every N x L, channels_last at a map and a large one; each dtype in both layouts
    for n in (1, 2, 8):
        for length, (h, w) in MAPS.items():
            _sweep_case(recorder, 'SN N x L', SwitchNorm2d(64), (n, 64, h, w), dtypes=fp32)
    for shape in ((1, 64, 7, 7), (8, 64, 56, 56)):
        _sweep_case(recorder, 'SN channels_last', SwitchNorm2d(64), shape, 'channels_last',
                    dtypes=fp32 + amp)
    for shape, layout in (((2, 64, 7, 7), 'nchw'), ((2, 64, 7, 7), 'channels_last'),
                          ((1, 64, 1, 1), 'nchw')):
        _sweep_case(recorder, 'SN float64', SwitchNorm2d(64), shape, layout,
                    dtypes=('float64',))
    # options, in training, inference, and eval mode inside a training step
    for kwargs in (dict(momentum=None), dict(affine=False), dict(using_bn=False)):
        name = ', '.join(f'{k}={v}' for k, v in kwargs.items())
        for shape in ((1, 64, 1, 1), (8, 64, 7, 7)):
            _sweep_case(recorder, f'SN {name}', SwitchNorm2d(64, **kwargs), shape,
                        modes=('train', 'eval', 'eval-grad'), dtypes=fp32)
    _sweep_case(recorder, 'SN eval-grad', SwitchNorm2d(64), (2, 64, 7, 7),
                modes=('eval-grad',), dtypes=fp32 + ('float16',))
    _sweep_case(recorder, 'SN odd C', SwitchNorm2d(3), (2, 3, 5, 9), dtypes=fp32)
    _sweep_case(recorder, 'SN wide C', SwitchNorm2d(2048), (2, 2048, 7, 7), dtypes=fp32)
    # SN1d and SN3d on the (N, C, L) views of 2d cases above: the same launches, by design
    for n in (1, 2, 8):
        _sweep_case(recorder, 'SN1d (N, C)', SwitchNorm1d(64), (n, 64), dtypes=fp32)
    _sweep_case(recorder, 'SN1d (N, C, L)', SwitchNorm1d(64), (2, 64, 49), dtypes=fp32)
    _sweep_case(recorder, 'SN3d', SwitchNorm3d(64), (2, 64, 1, 7, 7), dtypes=fp32)
    _sweep_case(recorder, 'SN3d', SwitchNorm3d(64), (1, 64, 1, 1, 1), dtypes=fp32)
    _sweep_case(recorder, 'SN3d channels_last_3d', SwitchNorm3d(64), (1, 64, 1, 7, 7),
                'channels_last_3d', dtypes=fp32)
    _sweep_case(recorder, 'SSN', SparseSwitchNorm2d(64), (2, 64, 7, 7), dtypes=fp32)
    # the largest volume: a 3D input of 1x64x128^3
    _sweep_case(recorder, 'SN3d volume 1x64x128^3', SwitchNorm3d(64), (1, 64, 128, 128, 128),
                dtypes=AMP_DTYPES)
    # SW at 16, 32 and 64 channels per group (64: Newton's iteration through scratch memory)
    edges = {16: ((1, 0), (1, 1), (1, 49), (8, 0), (8, 1), (8, 49), (2, 3136)),
             32: ((1, 1), (8, 0), (2, 3136)),
             64: ((1, 0), (1, 1), (8, 1), (8, 49), (2, 3136))}
    for per_group in (16, 32, 64):
        two = 2 * per_group
        for sw_type in (2, 3, 5):
            _sweep_case(recorder, f'SW{sw_type}-{per_group}',
                        SwitchWhiten2d(two, per_group, sw_type), (2, two, 7, 7), dtypes=fp32,
                        modes=('train', 'eval') + (('eval-grad',) if sw_type == 2 else ()))
        # the edges of N and L (type 5: every statistic)
        for n, length in edges[per_group]:
            _sweep_case(recorder, f'SW5-{per_group} N x L',
                        SwitchWhiten2d(per_group, per_group, 5),
                        (n, per_group) + MAPS[length], modes=('train',), dtypes=fp32)
        _sweep_case(recorder, f'SW5-{per_group} N x L', SwitchWhiten2d(per_group, per_group, 5),
                    (1, per_group, 1, 1), modes=('eval',), dtypes=fp32)
        _sweep_case(recorder, f'SW2-{per_group} float64', SwitchWhiten2d(two, per_group, 2),
                    (2, two, 7, 7), dtypes=('float64',))
        _sweep_case(recorder, f'SW2-{per_group} channels_last',
                    SwitchWhiten2d(two, per_group, 2), (2, two, 7, 7), 'channels_last',
                    dtypes=('bfloat16',) + (('float16',) if per_group == 64 else ()))
        if per_group != 32:
            _sweep_case(recorder, f'SW2-{per_group} channels_last',
                        SwitchWhiten2d(two, per_group, 2), (8, two, 56, 56), 'channels_last',
                        dtypes=fp32)
            _sweep_case(recorder, f'SW2-{per_group} momentum=None',
                        SwitchWhiten2d(two, per_group, 2, momentum=None), (2, two, 7, 7),
                        dtypes=fp32)
            _sweep_case(recorder, f'SW2-{per_group} affine=False',
                        SwitchWhiten2d(two, per_group, 2, affine=False), (2, two, 7, 7),
                        modes=('train', 'eval', 'eval-grad'), dtypes=fp32)
    _sweep_case(recorder, 'SW2-64 many groups', SwitchWhiten2d(1024, 64, 2), (2, 1024, 7, 7),
                dtypes=fp32)


def _sync_cases():
    """The synchronized part of the sweep: ``(name, layer factory, input shape per rank,
    dtypes)``; unequal batches, an empty rank, N = 1 with 1x1 maps."""
    from mmsn import SyncSwitchNorm, SyncSwitchWhiten2d
    fp32 = ('float32',)
    cases = [('SyncSN', lambda: SyncSwitchNorm(64), [(2, 64, 7, 7), (1, 64, 7, 7)], ALL_DTYPES),
             ('SyncSN empty rank', lambda: SyncSwitchNorm(64), [(2, 64, 7, 7), (0, 64, 7, 7)],
              fp32),
             ('SyncSN N=1 L=1', lambda: SyncSwitchNorm(64), [(1, 64, 1, 1), (1, 64, 1, 1)], fp32),
             ('SyncSN momentum=None', lambda: SyncSwitchNorm(64, momentum=None),
              [(2, 64, 7, 7), (2, 64, 7, 7)], fp32),
             ('SyncSN affine=False', lambda: SyncSwitchNorm(64, affine=False),
              [(2, 64, 7, 7), (2, 64, 7, 7)], fp32),
             ('SyncSN using_bn=False', lambda: SyncSwitchNorm(64, using_bn=False),
              [(2, 64, 7, 7), (2, 64, 7, 7)], fp32),
             ('SyncSN 3d', lambda: SyncSwitchNorm(64), [(2, 64, 1, 7, 7), (1, 64, 1, 7, 7)],
              fp32)]
    for per_group in (16, 32, 64):
        for sw_type in (2, 5):
            cases.append((f'SyncSW{sw_type}-{per_group}',
                          lambda p=per_group, t=sw_type: SyncSwitchWhiten2d(2 * p, p, t),
                          [(2, 2 * per_group, 7, 7), (1, 2 * per_group, 7, 7)],
                          ('float32', 'bfloat16') if (sw_type, per_group) == (2, 16) else fp32))
    cases.append(('SyncSW2-16 empty rank', lambda: SyncSwitchWhiten2d(32, 16, 2),
                  [(2, 32, 7, 7), (0, 32, 7, 7)], fp32))
    cases.append(('SyncSW2-16 momentum=None',
                  lambda: SyncSwitchWhiten2d(32, 16, 2, momentum=None),
                  [(2, 32, 7, 7), (2, 32, 7, 7)], fp32))
    return cases


def _sync_rank(rank, world, port, out):
    """One rank of the synchronized sweep: each call runs for real (reference path), so
    the records come from a working process group."""
    import torch.distributed as dist
    from datetime import timedelta

    from mmsn.layers import SwitchableLayer
    set_backend('torch')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    calls = []  # in call order: the ranks' lists line up call by call
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(dict(describe(module, args[0]), source=source,
                                              dtypes=dtypes))
        if isinstance(module, SwitchableLayer) else None)
    torch.manual_seed(0)
    for name, factory, shapes, dtypes in _sync_cases():
        layer = factory()
        source = f'sweep:{name}'
        for mode in ('train', 'eval'):
            train, input_grad, param_grad = MODES[mode]
            layer.train(train)
            x = torch.randn(shapes[rank]).requires_grad_(input_grad)
            with torch.set_grad_enabled(input_grad):
                y = layer(x)
            if y.requires_grad:
                y.sum().backward()
    hook.remove()
    dist.barrier()
    dist.destroy_process_group()
    with open(out, 'w') as f:
        json.dump(calls, f)


def sync_sweep(recorder, world=2):
    """Records the synchronized layers in a real ``world``-process gloo group; each record
    keeps the other ranks' inputs as ``peers``."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [osp.join(tmp, f'rank{r}.json') for r in range(world)]
        mp.start_processes(_sync_rank_main, args=(world, port, outs), nprocs=world,
                           start_method='spawn')
        per_rank = []
        for out in outs:
            with open(out) as f:
                per_rank.append(json.load(f))
    for mine, *others in zip(*per_rank):  # the same calls in the same order on every rank
        assert mine['world'] == world and all(o['source'] == mine['source'] for o in others)
        source, dtypes = mine.pop('source'), mine.pop('dtypes')
        recorder.add(dict(mine, peers=[[o['shape'], o['stride']] for o in others]), source,
                     dtypes)


def _sync_rank_main(rank, world, port, outs):
    _sync_rank(rank, world, port, outs[rank])


# --------------------------------------------------------------------------- the file

def versions():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    return {m.__name__: m.__version__ for m in (mmcv, mmengine, mmdet, mmseg)}


def fingerprint():
    """Digest of what decides the records (see the module docstring)."""
    digest = hashlib.sha256()
    for path in SOURCES:
        with open(osp.join(ROOT, path), 'rb') as f:
            digest.update(f.read())
    digest.update(json.dumps(versions(), sort_keys=True).encode())
    digest.update(f'records {RECORDS_VERSION}'.encode())
    for name, scope, norm in models():
        cfg = load_model_config(name, scope, norm)
        digest.update(model_name(name, norm).encode())
        digest.update(json.dumps(cfg.to_dict()['model'], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def record_all(log=print):
    set_backend('torch')  # the reference: what runs on the CPU
    import logging

    from mmengine.logging import MMLogger

    import mmsn  # noqa: F401 (registers the layers)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # (init_weights' report)
    recorder = CallRecorder()
    for name, scope, norm in models():
        start = time.time()
        before = len(recorder.records)
        record_model(recorder, name, scope, norm)
        log(f'{model_name(name, norm)}: {len(recorder.records) - before} new records '
            f'({time.time() - start:.1f} s)')
    start = time.time()
    sweep(recorder)
    sync_sweep(recorder)
    log(f'sweep: {time.time() - start:.1f} s')
    return recorder.calls()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT)
    parser.add_argument('--check', action='store_true',
                        help='only compare the fingerprint of --out with the current one')
    args = parser.parse_args(argv)
    current = fingerprint()
    if args.check:
        with open(args.out) as f:
            recorded = json.load(f)['fingerprint']
        if recorded != current:
            print(f'{args.out} is stale (fingerprint {recorded}, now {current}): '
                  f'regenerate it with `{COMMAND}`')
            return 1
        print(f'{args.out} is current ({current})')
        return 0
    calls = record_all()
    meta = dict(regenerate=COMMAND, fingerprint=current, versions=versions(),
                torch=torch.__version__.split('+')[0], image=IMAGE,
                models=[model_name(n, norm) for n, _, norm in models()])
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(dumps_calls(calls, meta))
    print(f'wrote {args.out}: {len(calls)} records, '
          f'{sum(len(c["dtypes"]) for c in calls)} with their dtypes')
    return 0


if __name__ == '__main__':
    sys.exit(main())
