"""mmsn.mm.launch: what tools/train.py and tools/test.py share."""
import torch.distributed as dist

from mmsn.mm.launch import finish_distributed


def test_finish_distributed_destroys_the_process_group(tmp_path):
    """The tools destroy their process group at the end of a run: with a live gloo group a
    finished process can abort at interpreter exit and torchrun reports the run as failed."""
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
