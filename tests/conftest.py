import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The zoo sweep is a tool of the repository, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

# One thread: test tensors are small, and threads only contend on shared CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Training on one thread (``pytestmark = pytest.mark.usefixtures("one_thread")``), whatever a test
    set before: on a busy shared machine two threads per process mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
