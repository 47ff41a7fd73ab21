"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is faster, and steadier when other jobs share the 2 cores.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored afterwards.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
