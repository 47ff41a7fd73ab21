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


@pytest.fixture(scope="session")
def tok():
    """The shipped world tokenizer (mmkit/checkpoints/tokenizer-world): what every model and notebook uses.

    Test files that need a freshly trained tokenizer define their own ``tok`` fixture, which overrides this one.
    """
    from mmkit.tokenizer import load_tokenizer
    return load_tokenizer("world")


@pytest.fixture(scope="session")
def sp(tok):
    """Special-token ids of the world tokenizer, as the masking functions take them."""
    from mmkit.tokenizer import SpecialIds
    return SpecialIds.from_tokenizer(tok)
