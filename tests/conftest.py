import pytest
import torch

# One thread: test tensors are small, and threads only contend on shared CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
