"""Fixtures more than one test file uses."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Torch on one thread for a module: tiny models run several times faster on one thread than
    on two that wait on each other in every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
