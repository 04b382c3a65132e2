r"""Networks $F_\theta(x, \operatorname{emb})$ of the reference (method.md §1.5).

Every network acts on one sample (batching is the caller's `vmap`) and reads the raw noise
embedding `emb` (method.md §1.3). Layer conventions of the reference, which differ from
equinox's defaults: Linear and Conv weights $\sim \mathcal{U}(\pm 1/\sqrt{\text{fan\_in}})$ with
bias $0$; LayerNorm over the channel axis only, without affine parameters.
"""

import itertools
import math
from collections.abc import Sequence

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


class ResBlock(eqx.Module):
    r"""Modulated residual block.

    $$h = \text{Conv}(\text{Dropout}(\text{SiLU}(\text{Conv}(\operatorname{LN}((1 + a) \odot x + b))))),
    \qquad \text{out} = \frac{x + c \odot h}{\sqrt{1 + c^2}}.$$

    **Arguments:**

    - `channels`: number $C$ of channels.
    - `emb_features`: size of the noise embedding.
    - `dropout`: dropout rate $p$.
    - `key`: initialisation key.
    """

    modulation: Modulation
    norm: LayerNorm
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dropout: eqx.nn.Dropout

    def __init__(self, channels: int, emb_features: int, dropout: float, *, key: PRNGKeyArray):
        key_mod, key1, key2 = jax.random.split(key, 3)
        self.modulation = Modulation(channels, emb_features, key=key_mod)
        self.norm = LayerNorm()
        self.conv1 = conv(channels, channels, key=key1)
        self.conv2 = conv(channels, channels, key=key2)
        self.dropout = eqx.nn.Dropout(dropout)

    def __call__(
        self,
        x: Float[Array, "C H W"],
        emb: Float[Array, " E"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "C H W"]:
        """Dropout is active iff `key` is given."""
        a, b, c = self.modulation(emb)
        h = self.norm((1 + a) * x + b)
        h = jax.nn.silu(self.conv1(h))
        h = self.conv2(self.dropout(h, key=key, inference=key is None))
        return (x + c * h) / jnp.sqrt(1 + c**2)


class AttBlock(eqx.Module):
    r"""Modulated multi-head self-attention block over the $H W$ pixels.

    $$h = \operatorname{Attention}(\operatorname{LN}((1 + a) \odot x + b)), \qquad
    \text{out} = \frac{x + c \odot h}{\sqrt{1 + c^2}},$$
    with $\operatorname{Attention}(u) = W_o \operatorname{softmax}(Q K^\top / \sqrt{C / \text{heads}}) V$
    per head, $Q, K, V$ projections of $u$ with bias and $W_o$ without. The attention is
    gradient-checkpointed: its $HW \times HW$ weights are recomputed in the backward pass
    instead of stored.

    **Arguments:**

    - `channels`: number $C$ of channels.
    - `emb_features`: size of the noise embedding.
    - `heads`: number of heads; divides $C$.
    - `key`: initialisation key.
    """

    modulation: Modulation
    norm: LayerNorm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, channels: int, emb_features: int, heads: int, *, key: PRNGKeyArray):
        key_mod, key_qkv, key_out = jax.random.split(key, 3)
        self.modulation = Modulation(channels, emb_features, key=key_mod)
        self.norm = LayerNorm()
        self.qkv = linear(channels, 3 * channels, key=key_qkv)
        self.out = eqx.nn.Linear(channels, channels, use_bias=False, key=key_out)
        self.heads = heads

    def __call__(
        self,
        x: Float[Array, "C H W"],
        emb: Float[Array, " E"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "C H W"]:
        """`key` is accepted for a common signature; there is no attention dropout."""
        C, H, W = x.shape
        a, b, c = self.modulation(emb)
        tokens = self.norm((1 + a) * x + b).reshape(C, H * W).T
        q, k, v = jnp.split(jax.vmap(self.qkv)(tokens), 3, axis=-1)
        q, k, v = (t.reshape(H * W, self.heads, C // self.heads) for t in (q, k, v))
        h = jax.checkpoint(jax.nn.dot_product_attention)(q, k, v).reshape(H * W, C)
        h = jax.vmap(self.out)(h).T.reshape(C, H, W)
        return (x + c * h) / jnp.sqrt(1 + c**2)


def pixel_unshuffle(x: Float[Array, "C H W"], r: int) -> Array:
    """Folds each r×r patch into channels.

    `out[c r² + i r + j, h, w] = x[c, h r + i, w r + j]`, as `torch.nn.functional.pixel_unshuffle`.
    """
    C, H, W = x.shape
    x = x.reshape(C, H // r, r, W // r, r).transpose(0, 2, 4, 1, 3)
    return x.reshape(C * r * r, H // r, W // r)


def pixel_shuffle(x: Float[Array, "C H W"], r: int) -> Array:
    """Inverse of [`pixel_unshuffle`][]."""
    C, H, W = x.shape
    x = x.reshape(C // (r * r), r, r, H, W).transpose(0, 3, 1, 4, 2)
    return x.reshape(C // (r * r), H * r, W * r)


def _upsample(x: Float[Array, "C H W"]) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(eqx.Module):
    r"""Modulated image U-Net of the reference (method.md §1.5), channels first.

    Descent, level $i$: $\text{Conv}(C_\text{in} \to C_0)$ at $i = 0$, else
    $\text{Conv}_{\text{stride } 2}(C_{i-1} \to C_i) \to \operatorname{LN}$; then $B_i \times$
    [ResBlock (+ AttBlock)]; the level's output is its skip. Ascent, from the deepest level:
    $\text{Conv}(C_i + C_{i+1} \to C_i)$ on $[x, \text{skip}_i]$ (not at the deepest level);
    $B_i \times$ [ResBlock (+ AttBlock)]; then $\operatorname{LN} \to$ nearest $\times 2$ for
    $i > 0$, or a per-pixel $\text{Linear}(C_0 \to C_\text{out})$ at $i = 0$. With
    `unshuffle` $= r > 1$ the image is pixel-unshuffled by $r$ before and shuffled back after.

    **Arguments:**

    - `in_channels`, `out_channels`: channels of the image (before unshuffling).
    - `widths`: channels $C_i$ per level.
    - `blocks`: number $B_i$ of blocks per level, in the descent and again in the ascent.
    - `attention`: levels with an AttBlock after every ResBlock.
    - `heads`: attention heads.
    - `emb_features`: size of the noise embedding.
    - `dropout`: dropout rate of the ResBlocks.
    - `unshuffle`: pixel-unshuffle factor $r$; $H$ and $W$ must be multiples of
      $r \cdot 2^{L-1}$.
    - `key`: initialisation key.
    """

    entries: list[eqx.nn.Conv2d]
    down: list[list[ResBlock | AttBlock]]
    merges: list[eqx.nn.Conv2d | None]
    up: list[list[ResBlock | AttBlock]]
    final: eqx.nn.Conv2d
    norm: LayerNorm
    unshuffle: int = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        widths: Sequence[int] = (128, 256, 384),
        blocks: Sequence[int] = (5, 5, 5),
        attention: Sequence[int] = (1,),
        heads: int = 4,
        emb_features: int = 256,
        dropout: float = 0.1,
        unshuffle: int = 1,
        key: PRNGKeyArray,
    ):
        levels = len(widths)
        level_keys = jax.random.split(key, levels + 1)
        r2 = unshuffle**2

        def stage(i, key):
            layers, keys = [], jax.random.split(key, 2 * blocks[i])
            for j in range(blocks[i]):
                layers.append(ResBlock(widths[i], emb_features, dropout, key=keys[2 * j]))
                if i in attention:
                    layers.append(AttBlock(widths[i], emb_features, heads, key=keys[2 * j + 1]))
            return layers

        self.entries, self.down, self.merges, self.up = [], [], [], []
        for i in range(levels):
            key_entry, key_merge, key_down, key_up = jax.random.split(level_keys[i], 4)
            if i == 0:
                self.entries.append(conv(in_channels * r2, widths[0], key=key_entry))
            else:
                self.entries.append(conv(widths[i - 1], widths[i], stride=2, key=key_entry))
            if i + 1 < levels:
                self.merges.append(conv(widths[i] + widths[i + 1], widths[i], key=key_merge))
            else:
                self.merges.append(None)
            self.down.append(stage(i, key_down))
            self.up.append(stage(i, key_up))
        self.final = conv(widths[0], out_channels * r2, kernel_size=1, key=level_keys[-1])
        self.norm = LayerNorm()
        self.unshuffle = unshuffle

    def __call__(
        self,
        x: Float[Array, "C_in H W"],
        emb: Float[Array, " E"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "C_out H W"]:
        """Dropout is active iff `key` is given (training); `key=None` is inference."""
        counter = itertools.count()

        def block(layer, x):
            k = None if key is None else jax.random.fold_in(key, next(counter))
            return layer(x, emb, key=k)

        x = pixel_unshuffle(x, self.unshuffle)
        skips = []
        for i, (entry, stage) in enumerate(zip(self.entries, self.down)):
            x = entry(x) if i == 0 else self.norm(entry(x))
            for layer in stage:
                x = block(layer, x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            if self.merges[i] is not None:
                x = self.merges[i](jnp.concatenate([x, skips[i]]))
            for layer in self.up[i]:
                x = block(layer, x)
            x = _upsample(self.norm(x)) if i > 0 else self.final(x)
        return pixel_shuffle(x, self.unshuffle)


def cifar_unet(*, key: PRNGKeyArray, **overrides) -> UNet:
    """The paper's CIFAR-10 U-Net on 3×32×32 images (≈57.6 M parameters).

    **Arguments:**

    - `key`: initialisation key.
    - `overrides`: [`UNet`][] arguments that replace the paper's, e.g. smaller `widths`.
    """
    config = dict(
        widths=(128, 256, 384), blocks=(5, 5, 5), attention=(1,), heads=4,
        emb_features=256, dropout=0.1,
    )
    return UNet(3, 3, **(config | overrides), key=key)


def fastmri_unet(*, key: PRNGKeyArray, **overrides) -> UNet:
    """The paper's fastMRI U-Net on 1×320×320 images unshuffled by 4 (≈77.6 M parameters).

    **Arguments:**

    - `key`: initialisation key.
    - `overrides`: [`UNet`][] arguments that replace the paper's, e.g. smaller `widths`.
    """
    config = dict(
        widths=(128, 256, 384, 512), blocks=(3, 3, 3, 3), attention=(3,), heads=4,
        emb_features=256, dropout=0.1, unshuffle=4,
    )
    return UNet(1, 1, **(config | overrides), key=key)


def count_parameters(module: PyTree) -> int:
    """Number of floating-point parameters, for arrays or `jax.ShapeDtypeStruct` leaves
    (as from `eqx.filter_eval_shape`)."""
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree.leaves(module)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )
