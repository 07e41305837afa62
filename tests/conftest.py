"""Shared pytest fixtures."""
import pytest


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny models are fastest that way, and the 2-core test
    machine is often shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
