r"""The layers of the reference's networks, with its initialisation (the paper's experiment details; docs/conventions.md, "Networks").

Every layer acts on one sample (batching is the caller's `vmap`). The reference's conventions,
which differ from equinox's defaults: Linear and Conv weights
$\sim \mathcal{U}(\pm 1/\sqrt{\text{fan\_in}})$ with bias $0$; LayerNorm over the channel axis
only, without affine parameters; a per-block modulation MLP that reads the raw noise embedding.

Images are **channels last** inside the networks, `(H, W, C)` with `(kh, kw, in, out)` kernels,
the layout of XLA's fast CPU convolution: a channels-first (NCHW) convolution runs many times
slower inside a loop (`lax.scan`, as in our samplers and training loops; jax-ml/jax#12868).
Weights keep equinox's `(out, in, kh, kw)` layout. On the CPU the convolution's VJP is ours
([`Conv2d`][]; docs/conventions.md, 'Networks').
"""

import functools
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


def _hwio(weight: Array) -> Array:
    """Equinox's `(out, in, kh, kw)` kernel as `(kh, kw, in, out)`, the layout XLA's CPU convolution wants."""
    return jnp.transpose(weight, (2, 3, 1, 0))


def _conv(x, weight, stride, padding):
    """XLA's own convolution of a batch of channels-last images `(B, H, W, C)`."""
    return jax.lax.conv_general_dilated(
        x, _hwio(weight), stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _input_gradient(cotangent, weight, stride, padding, shape):
    r"""The gradient with respect to the input, as a stride-1 convolution in the same layout.

    $\partial x[p] = \sum_t \bar y[(p + \text{lo} - t) / s] \, W_t^\top$ (over the $t$ for which
    $s$ divides): the cotangent dilated by the stride (zeros between its pixels), padded by
    $k - 1 - \text{lo}$ before and what restores `shape` after, convolved with the spatially
    flipped kernel whose in and out are swapped.
    """
    pads = [(0, 0, 0)]
    for size, k, s, rows, (lo, _) in zip(shape[1:3], weight.shape[2:], stride, cotangent.shape[1:3], padding):
        pads.append((k - 1 - lo, size - 1 - s * (rows - 1) + lo, s - 1))
    dilated = jax.lax.pad(cotangent, jnp.zeros((), cotangent.dtype), pads + [(0, 0, 0)])
    flipped = jnp.flip(_hwio(weight), (0, 1)).swapaxes(2, 3)
    return jax.lax.conv_general_dilated(
        dilated, flipped, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _weight_gradient(x, cotangent, weight, stride, padding):
    r"""The gradient with respect to the kernel, one matmul per kernel tap over the whole batch.

    $\partial W_{t} = \sum_{b, p} \bar y_b[p] \, x_b[s p + t - \text{lo}]^\top$: for each of the
    $k_h k_w$ taps $t$, the cotangent `(B H' W', O)` and the input's pixels under that tap, a strided
    window of the padded input `(B H' W', C)`, both channels last as they are, contracted over
    their rows. No tap is stacked with another or transposed: each window is read once, by its own
    matmul.
    """
    out, channels, kh, kw = weight.shape
    rows, cols = cotangent.shape[1:3]
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    cotangent = cotangent.reshape(-1, out)

    def tap(i, j):
        window = padded[:, i : i + stride[0] * (rows - 1) + 1 : stride[0], j : j + stride[1] * (cols - 1) + 1 : stride[1]]
        return jax.lax.dot_general(cotangent, window.reshape(-1, channels), (((0,), (0,)), ((), ())))

    return jnp.stack([tap(i, j) for i in range(kh) for j in range(kw)], axis=-1).reshape(weight.shape)


@functools.cache
def _cpu_conv(stride, padding):
    """The CPU convolution of one image `(H, W, C)`, for `vmap` to batch.

    Under `vmap` (how `Denoiser` calls networks) it convolves the whole batch at once, and its
    VJP is [`_input_gradient`][] and [`_weight_gradient`][] over that batch: the kernel's gradient
    is summed over the batch inside its matmuls, where a per-image VJP would leave `vmap` a
    batched matmul per image and a sum. The cost: on the CPU, `Conv2d` is differentiable only under a
    `vmap` over the images (`jax.custom_batching.custom_vmap` has no reverse mode of its own).
    """

    @jax.custom_vjp
    def batched(x, weight):
        return _conv(x, weight, stride, padding)

    def forward(x, weight):
        return batched(x, weight), (x, weight)

    def backward(residuals, cotangent):
        x, weight = residuals
        return (
            _input_gradient(cotangent, weight, stride, padding, x.shape),
            _weight_gradient(x, cotangent, weight, stride, padding),
        )

    batched.defvjp(forward, backward)

    @jax.custom_batching.custom_vmap
    def one(x, weight):
        return batched(x[None], weight)[0]

    @one.def_vmap
    def rule(axis_size, in_batched, x, weight):
        x_batched, weight_batched = in_batched
        if weight_batched:  # e.g. an ensemble of networks: one convolution per image and kernel
            per_image = jax.vmap(lambda x, w: batched(x[None], w)[0], in_axes=(0 if x_batched else None, 0))
            return per_image(x, weight), True
        return batched(x, weight), True

    return one


class Conv2d(eqx.nn.Conv2d):
    """`equinox.nn.Conv2d` (same weights, same initialisation) acting on channels-last `(H, W, C)`.

    On the CPU, XLA's own gradients of a convolution run about 100 times slower than the
    convolution (their transposed layouts miss its fast kernels), so the VJP is ours: the input
    gradient a convolution in the same layout, the kernel gradient a matmul per kernel tap, both
    over the whole batch under `vmap` ([`_cpu_conv`][]; docs/conventions.md, 'Networks').
    A U-Net's training step then costs about 3.3 to 3.5 forward passes (`benchmarks/bench_mstep.py`).
    On the CPU the layer is differentiable under a `vmap` over the images only. Other backends
    use XLA's own convolution and gradients.
    """

    def __call__(self, x: Float[Array, "H W C"], *, key: PRNGKeyArray | None = None) -> Float[Array, "H2 W2 O"]:
        if self.dilation != (1, 1) or self.groups != 1:
            raise NotImplementedError("Conv2d: dilation and groups are not used by our networks")
        if jax.default_backend() == "cpu":
            y = _cpu_conv(self.stride, self.padding)(x, self.weight)
        else:
            y = _conv(x[None], self.weight, self.stride, self.padding)[0]
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
