"""Kernel tests run their Triton kernels on CUDA tensors when a GPU is present (compiled) and on
CPU tensors under the interpreter otherwise: tensors made without a device land on DEVICE."""
import pytest
import torch
from kernel_testing import DEVICE


@pytest.fixture(autouse=True, scope="module")
def _tensors_on_the_kernel_device():
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)
