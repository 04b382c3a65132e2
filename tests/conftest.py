"""Tests run in float64 so that closed-form comparisons can use tight tolerances."""

import jax

jax.config.update("jax_enable_x64", True)
