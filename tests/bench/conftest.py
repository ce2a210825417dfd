import pytest
import torch
import tiny_lm

from tiny_lm import JUDGE_REPLY, POLICY_REPLY


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one intra-op thread is several times faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory):
    return tiny_lm.fixed_reply_model(tmp_path_factory, JUDGE_REPLY)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    return tiny_lm.fixed_reply_model(tmp_path_factory, POLICY_REPLY)


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory):
    return tiny_lm.tiny_rm(tmp_path_factory)
