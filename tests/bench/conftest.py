import pytest
import tiny_lm
from tiny_lm import judge_dir, one_thread  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    """A tiny 'policy' that always answers POLICY_REPLY."""
    return tiny_lm.fixed_reply_model(tmp_path_factory, tiny_lm.POLICY_REPLY)


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory):
    return tiny_lm.tiny_rm(tmp_path_factory)
