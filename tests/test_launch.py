"""mmsn.mm.launch and mmsn.mm.process_group: what tools/train.py and tools/test.py share."""
import os
import sys
import textwrap

import pytest
import torch.distributed as dist

from mmsn.mm.process_group import dist_timeout, finish_distributed
from processes import run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finish_distributed_destroys_the_process_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        finish_distributed()
        assert not dist.is_initialized()
        finish_distributed()  # no group: nothing to do
    finally:  # a failure above must not leave a group behind for later tests
        if dist.is_initialized():
            dist.destroy_process_group()


# A trainer's end in miniature: DistributedDataParallel held in a reference cycle (as
# mmengine's runner holds it), collectives on temporary tensors, then the tools' ending.
TRAINER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from mmsn.mm.process_group import _gloo_threads, finish_distributed
    dist.init_process_group('gloo')

    class Runner:
        def __init__(self):
            self.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
            self.cycle = self

    def main():
        runner = Runner()
        for _ in range(3):
            runner.model(torch.randn(4, 8)).sum().backward()
            total = torch.ones(16)
            dist.all_reduce(total)
            del total
        if sys.argv[1] == 'destroy-only':
            dist.destroy_process_group()
        else:
            del runner
            finish_distributed()
        print(f'rank {sys.argv[1]} gloo threads at exit: {_gloo_threads()}', flush=True)

    main()
''')


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_gloo_thread_outlives_a_finished_run(tmp_path):
    """gloo's worker threads free finished collectives' tensors under the GIL; one still
    doing so while the interpreter finalizes is ended by Python and aborts the process
    (SIGABRT, 'terminate called without an active exception'). destroy_process_group alone
    leaves them running while DDP holds the group; finish_distributed ends them all."""
    script = tmp_path / 'trainer.py'
    script.write_text(TRAINER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    logs = {}
    for port, ending in ((29000 + os.getpid() % 500, 'destroy-only'),
                         (29500 + os.getpid() % 500, 'finish')):
        logs[ending] = run_job(
            [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
             '--master_port', str(port), str(script), ending], timeout=90,
            log_path=str(tmp_path / f'{ending}.log'), env=env, check=ending == 'finish')
    assert "destroy-only gloo threads at exit: ['" in logs['destroy-only']
    assert logs['finish'].count('finish gloo threads at exit: []') == 2
    assert 'still running' not in logs['finish']


def test_dist_timeout_comes_from_env_cfg():
    from mmengine.config import Config
    assert dist_timeout(Config(dict())) is None
    assert dist_timeout(Config(dict(env_cfg=dict(dist_cfg=dict(timeout=5))))) == 5.0
    for bad in (0, -1, '5', True):
        with pytest.raises(ValueError, match='env_cfg.dist_cfg.timeout: expected a positive'):
            dist_timeout(Config(dict(env_cfg=dict(dist_cfg=dict(timeout=bad)))))
