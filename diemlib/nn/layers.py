r"""The layers of the reference's networks, with its initialisation (the paper's experiment details; docs/conventions.md, "Networks").

Every layer acts on one sample (batching is the caller's `vmap`). The reference's conventions,
which differ from equinox's defaults: Linear and Conv weights
$\sim \mathcal{U}(\pm 1/\sqrt{\text{fan\_in}})$ with bias $0$; LayerNorm over the channel axis
only, without affine parameters; a per-block modulation MLP that reads the raw noise embedding.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree


def _zero_bias(layer):
    return eqx.tree_at(lambda l: l.bias, layer, jnp.zeros_like(layer.bias))


def linear(in_features: int, out_features: int, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    r"""Linear layer with weight $\sim \mathcal{U}(\pm 1/\sqrt{\text{in}})$ and bias $0$."""
    return _zero_bias(eqx.nn.Linear(in_features, out_features, key=key))


def conv(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *, key: PRNGKeyArray
) -> eqx.nn.Conv2d:
    r"""2-d convolution, 'same' padding, weight $\sim \mathcal{U}(\pm 1/\sqrt{\text{in} \cdot k^2})$
    and bias $0$; acts on `(C, H, W)`."""
    layer = eqx.nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, key=key
    )
    return _zero_bias(layer)


class LayerNorm(eqx.Module):
    r"""Layer normalisation over the channel axis (axis 0), without learnable affine.

    $$\operatorname{LN}(x) = \frac{x - \operatorname{mean}_C(x)}{\sqrt{\operatorname{var}_C(x) + \epsilon}}$$

    **Arguments:**

    - `eps`: the $\epsilon$ above.
    """

    eps: float = eqx.field(static=True, default=1e-5)

    def __call__(self, x: Float[Array, "C ..."]) -> Float[Array, "C ..."]:
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = jnp.var(x, axis=0, keepdims=True)
        return (x - mean) / jnp.sqrt(var + self.eps)


class Modulation(eqx.Module):
    r"""Per-block modulation $(a, b, c) = \text{Linear}_2(\text{SiLU}(\text{Linear}_1(\operatorname{emb})))$.

    $\text{Linear}_2$ maps to $3C$ features and its weight is scaled by $0.1$ at
    initialisation, so that $c \approx 0$ and the block starts near identity.

    **Arguments:**

    - `channels`: number $C$ of channels modulated.
    - `emb_features`: size of the noise embedding.
    - `key`: initialisation key.
    """

    hidden: eqx.nn.Linear
    output: eqx.nn.Linear

    def __init__(self, channels: int, emb_features: int, *, key: PRNGKeyArray):
        key_hidden, key_output = jax.random.split(key)
        self.hidden = linear(emb_features, emb_features, key=key_hidden)
        output = linear(emb_features, 3 * channels, key=key_output)
        self.output = eqx.tree_at(lambda l: l.weight, output, 0.1 * output.weight)

    def __call__(self, emb: Float[Array, " E"]) -> tuple[Array, Array, Array]:
        """Returns $(a, b, c)$, each of shape `(C, 1, 1)` to broadcast over pixels."""
        abc = self.output(jax.nn.silu(self.hidden(emb)))
        return tuple(t[:, None, None] for t in jnp.split(abc, 3))


def count_parameters(module: PyTree) -> int:
    """Number of floating-point parameters, for arrays or `jax.ShapeDtypeStruct` leaves
    (as from `eqx.filter_eval_shape`)."""
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree.leaves(module)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )
