r"""The layers of the reference's networks, with its initialisation (the paper's experiment details; docs/conventions.md, "Networks").

Every layer acts on one sample (batching is the caller's `vmap`). The reference's conventions,
which differ from equinox's defaults: Linear and Conv weights
$\sim \mathcal{U}(\pm 1/\sqrt{\text{fan\_in}})$ with bias $0$; LayerNorm over the channel axis
only, without affine parameters; a per-block modulation MLP that reads the raw noise embedding.

Images are **channels last** inside the networks, `(H, W, C)`: XLA's CPU backend runs a
channels-first (NCHW) convolution about 16 times slower inside a loop (`lax.scan`, as in our
samplers and training loops) than outside it, while channels-last convolutions run at full speed
in both (measured by `benchmarks/bench_mstep.py`; jax-ml/jax#12868). Weights keep equinox's
`(out, in, kh, kw)` layout.
"""

import math
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree


def _zero_bias(layer):
    return eqx.tree_at(lambda l: l.bias, layer, jnp.zeros_like(layer.bias))


def linear(in_features: int, out_features: int, *, key: PRNGKeyArray) -> eqx.nn.Linear:
    r"""Linear layer with weight $\sim \mathcal{U}(\pm 1/\sqrt{\text{in}})$ and bias $0$."""
    return _zero_bias(eqx.nn.Linear(in_features, out_features, key=key))


def _hwio(weight: Array) -> Array:
    """Equinox's `(out, in, kh, kw)` kernel as `(kh, kw, in, out)`, the layout XLA's CPU convolution wants."""
    return jnp.transpose(weight, (2, 3, 1, 0))


def _conv(x, weight, stride, padding):
    return jax.lax.conv_general_dilated(
        x[None], _hwio(weight), stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )[0]


def _conv_as_matmul(x, weight, stride, padding):
    """The same convolution as one matmul over the `kh kw` shifted copies of `x` (im2col)."""
    out, _, kh, kw = weight.shape
    (top, bottom), (left, right) = padding
    padded = jnp.pad(x, ((top, bottom), (left, right), (0, 0)))
    rows = (padded.shape[0] - kh) // stride[0] + 1
    cols = (padded.shape[1] - kw) // stride[1] + 1
    patches = jnp.concatenate(
        [
            padded[i : i + stride[0] * (rows - 1) + 1 : stride[0], j : j + stride[1] * (cols - 1) + 1 : stride[1]]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )
    return patches @ _hwio(weight).reshape(-1, out)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv(x, weight, stride, padding):
    return _conv(x, weight, stride, padding)


def _cpu_conv_fwd(x, weight, stride, padding):
    return _conv(x, weight, stride, padding), (x, weight)


def _cpu_conv_bwd(stride, padding, residuals, cotangent):
    x, weight = residuals
    return jax.vjp(lambda x, w: _conv_as_matmul(x, w, stride, padding), x, weight)[1](cotangent)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


class Conv2d(eqx.nn.Conv2d):
    """`equinox.nn.Conv2d` (same weights, same initialisation) acting on channels-last `(H, W, C)`.

    On the CPU, where XLA runs the gradients of a convolution much slower inside loops than
    outside (the transposed convolutions get layouts its fast kernel does not take), the
    backward pass is that of the same convolution written as a matmul (im2col): about 3 to 15
    times faster inside `lax.scan` (`benchmarks/bench_mstep.py`). Other backends use XLA's own.
    """

    def __call__(self, x: Float[Array, "H W C"], *, key: PRNGKeyArray | None = None) -> Float[Array, "H2 W2 O"]:
        if self.dilation != (1, 1) or self.groups != 1:
            raise NotImplementedError("Conv2d: dilation and groups are not used by our networks")
        conv = _cpu_conv if jax.default_backend() == "cpu" else _conv
        y = conv(x, self.weight, self.stride, self.padding)
        return y if self.bias is None else y + self.bias.reshape(-1)


def conv(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, *, key: PRNGKeyArray
) -> Conv2d:
    r"""2-d convolution, 'same' padding, weight $\sim \mathcal{U}(\pm 1/\sqrt{\text{in} \cdot k^2})$
    and bias $0$; acts on `(H, W, C)`."""
    layer = Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, key=key)
    return _zero_bias(layer)


class LayerNorm(eqx.Module):
    r"""Layer normalisation over the channel axis (the last), without learnable affine.

    $$\operatorname{LN}(x) = \frac{x - \operatorname{mean}_C(x)}{\sqrt{\operatorname{var}_C(x) + \epsilon}}$$

    **Arguments:**

    - `eps`: the $\epsilon$ above.
    """

    eps: float = eqx.field(static=True, default=1e-5)

    def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... C"]:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.var(x, axis=-1, keepdims=True)
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
        """Returns $(a, b, c)$, each of shape `(C,)`: they broadcast over the pixels of `(H, W, C)`."""
        abc = self.output(jax.nn.silu(self.hidden(emb)))
        return tuple(jnp.split(abc, 3))


def count_parameters(module: PyTree) -> int:
    """Number of floating-point parameters, for arrays or `jax.ShapeDtypeStruct` leaves
    (as from `eqx.filter_eval_shape`)."""
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree.leaves(module)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )
