"""Tests run in float64 so that closed-form comparisons can use tight tolerances."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (faster than two on a shared 2-core machine); restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
