r"""The modulated image U-Net of the reference (the paper's experiment details; docs/conventions.md, "Networks"), for CIFAR-10 and fastMRI.

One sample at a time, `(C, H, W)` in and out, reading the raw noise embedding `emb`; blocks
start near identity. Inside, images are channels last, `(H, W, C)` (see `diemlib.nn.layers`:
XLA's CPU convolutions are much faster so inside loops). Widths, blocks and attention levels are arguments, so CPU profiles shrink the network
without another code path.
"""

import abc
import itertools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .layers import Conv2d, LayerNorm, Modulation, conv, linear


class ModulatedBlock(eqx.Module):
    r"""What every block of the U-Net shares: a modulated branch merged back into its input.

    $$(a, b, c) = \text{Modulation}(\operatorname{emb}), \qquad
    \text{out} = \frac{x + c \odot F(\operatorname{LN}((1 + a) \odot x + b))}{\sqrt{1 + c^2}},$$
    with the branch $F$ of the subclass ([`ResBlock`][], [`AttBlock`][]). The modulation starts
    with $c \approx 0$, so every block starts near identity.
    """

    modulation: Modulation
    norm: LayerNorm

    @abc.abstractmethod
    def branch(self, h: Float[Array, "H W C"], key: PRNGKeyArray | None) -> Float[Array, "H W C"]:
        """The branch $F$ on the modulated, normalised input."""

    def __call__(
        self,
        x: Float[Array, "H W C"],
        emb: Float[Array, " E"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "H W C"]:
        """`key` reaches the branch (dropout is active iff it is given)."""
        a, b, c = self.modulation(emb)
        h = self.branch(self.norm((1 + a) * x + b), key)
        return (x + c * h) / jnp.sqrt(1 + c**2)


class ResBlock(ModulatedBlock):
    r"""Modulated residual block.

    $$h = \text{Conv}(\text{Dropout}(\text{SiLU}(\text{Conv}(\operatorname{LN}((1 + a) \odot x + b))))),
    \qquad \text{out} = \frac{x + c \odot h}{\sqrt{1 + c^2}}.$$

    **Arguments:**

    - `channels`: number $C$ of channels.
    - `emb_features`: size of the noise embedding.
    - `dropout`: dropout rate $p$.
    - `key`: initialisation key.
    """

    conv1: Conv2d
    conv2: Conv2d
    dropout: eqx.nn.Dropout

    def __init__(self, channels: int, emb_features: int, dropout: float, *, key: PRNGKeyArray):
        key_mod, key1, key2 = jax.random.split(key, 3)
        self.modulation = Modulation(channels, emb_features, key=key_mod)
        self.norm = LayerNorm()
        self.conv1 = conv(channels, channels, key=key1)
        self.conv2 = conv(channels, channels, key=key2)
        self.dropout = eqx.nn.Dropout(dropout)

    def branch(self, h, key):
        """Dropout is active iff `key` is given."""
        h = jax.nn.silu(self.conv1(h))
        return self.conv2(self.dropout(h, key=key, inference=key is None))


class AttBlock(ModulatedBlock):
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

    def branch(self, h, key):
        """`key` is accepted for a common signature; there is no attention dropout."""
        H, W, C = h.shape
        tokens = h.reshape(H * W, C)
        q, k, v = jnp.split(jax.vmap(self.qkv)(tokens), 3, axis=-1)
        q, k, v = (t.reshape(H * W, self.heads, C // self.heads) for t in (q, k, v))
        h = jax.checkpoint(jax.nn.dot_product_attention)(q, k, v).reshape(H * W, C)
        return jax.vmap(self.out)(h).reshape(H, W, C)


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


def _upsample(x: Float[Array, "H W C"]) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)


class UNet(eqx.Module):
    r"""Modulated image U-Net of the reference (docs/conventions.md, 'Networks'), channels first.

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

    entries: list[Conv2d]
    down: list[list[ResBlock | AttBlock]]
    merges: list[Conv2d | None]
    up: list[list[ResBlock | AttBlock]]
    final: Conv2d
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

        x = jnp.transpose(pixel_unshuffle(x, self.unshuffle), (1, 2, 0))  # channels last inside
        skips = []
        for i, (entry, stage) in enumerate(zip(self.entries, self.down)):
            x = entry(x) if i == 0 else self.norm(entry(x))
            for layer in stage:
                x = block(layer, x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            if self.merges[i] is not None:
                x = self.merges[i](jnp.concatenate([x, skips[i]], axis=-1))
            for layer in self.up[i]:
                x = block(layer, x)
            x = _upsample(self.norm(x)) if i > 0 else self.final(x)
        return pixel_shuffle(jnp.transpose(x, (2, 0, 1)), self.unshuffle)


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


