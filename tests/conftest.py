"""Fixtures more than one test file uses."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line('markers', 'concept: a test that teaches one idea of the recipe, indexed in '
                                       'tests/README.md; run them alone with `python -m pytest -m concept tests`')


@pytest.fixture(scope='module')
def one_thread():
    """Torch on one thread for a module: tiny models run several times faster on one thread than
    on two that wait on each other in every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
