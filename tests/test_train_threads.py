"""Ranks sharing one CPU machine split its cores (torchrun's rule) instead of each starting a thread per core."""

from mllm.train.distributed import cpu_threads_per_rank


def test_ranks_on_one_node_share_its_cores():
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2"}, cpus=16) == 8  # the deepspeed launcher's variable
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "4"}, cpus=16) == 4  # torchrun's
    assert cpu_threads_per_rank({"LOCAL_SIZE": "4"}, cpus=2) == 1  # never below one


def test_a_lone_rank_or_a_users_setting_keeps_torchs_default():
    assert cpu_threads_per_rank({}, cpus=16) is None
    assert cpu_threads_per_rank({"LOCAL_SIZE": "1"}, cpus=16) is None
    assert cpu_threads_per_rank({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, cpus=16) is None


def test_joining_the_group_sets_the_share(monkeypatch):
    import torch

    from mllm.train import distributed

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    try:
        distributed.share_cpu_threads({"LOCAL_SIZE": "2"})
        assert torch.get_num_threads() == 8  # 16 cores, 2 ranks (not any default here)
    finally:
        torch.set_num_threads(before)
