r"""The manifold network of §5.1: a residual-free MLP over $[x, \operatorname{emb}]$ (the paper's experiment details; docs/conventions.md, "Networks")."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import LayerNorm, linear


class MLP(eqx.Module):
    r"""Manifold network: $[x, \operatorname{emb}] \to (\text{Linear} \to \text{SiLU} \to
    \text{LayerNorm})^{\times L} \to \text{Linear}$.

    **Arguments:**

    - `features`: size of $x$ and of the output.
    - `emb_features`: size of the noise embedding.
    - `hidden`: width of the hidden layers.
    - `layers`: number $L$ of hidden layers.
    - `key`: initialisation key.
    """

    hidden_layers: list[eqx.nn.Linear]
    output: eqx.nn.Linear
    norm: LayerNorm

    def __init__(
        self,
        features: int,
        *,
        emb_features: int = 64,
        hidden: int = 256,
        layers: int = 3,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, layers + 1)
        sizes = [features + emb_features] + [hidden] * layers
        self.hidden_layers = [linear(i, o, key=k) for i, o, k in zip(sizes, sizes[1:], keys)]
        self.output = linear(hidden, features, key=keys[-1])
        self.norm = LayerNorm()

    def __call__(
        self,
        x: Float[Array, " features"],
        emb: Float[Array, " emb_features"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " features"]:
        """`key` is accepted for a common signature; the MLP has no dropout."""
        h = jnp.concatenate([x, emb])
        for layer in self.hidden_layers:
            h = self.norm(jax.nn.silu(layer(h)))
        return self.output(h)
