"""Tests of the networks of method.md §1.5: shapes, initialisation, dropout, sizes, gradients."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.nn.layers import LayerNorm, Modulation, count_parameters
from diemlib.nn.mlp import MLP
from diemlib.nn.unet import AttBlock, ResBlock, UNet, cifar_unet, fastmri_unet, pixel_shuffle, pixel_unshuffle

# The networks take any key; XLA on CPU compiles "rbg" random bits several times faster than
# the default threefry, and initialisation compiles one sampler per weight shape.
def key(seed):
    return jax.random.key(seed, impl="rbg")


KEY = key(0)
EMB = 32


def emb(seed=1, features=EMB):
    return jax.random.normal(key(seed), (features,))


def layers(module, kind):
    is_kind = lambda m: isinstance(m, kind)
    return [m for m in jax.tree.leaves(module, is_leaf=is_kind) if is_kind(m)]


@eqx.filter_jit
def apply(net, x, e, key=None):
    return net(x, e, key=key)


@pytest.fixture(scope="module")
def unet():
    """Two levels, one block each, attention at level 1: every code path of the U-Net."""
    return UNet(3, 3, widths=(16, 32), blocks=(1, 1), attention=(1,), emb_features=EMB, key=KEY)


def test_mlp_shape():
    mlp = MLP(5, key=KEY)
    assert apply(mlp, jnp.ones(5), emb(features=64)).shape == (5,)


def test_unet_shape(unet):
    x = jax.random.normal(KEY, (3, 8, 8))
    assert apply(unet, x, emb()).shape == (3, 8, 8)


def test_unshuffled_unet_shape():
    net = UNet(
        1, 1, widths=(16, 32), blocks=(1, 1), attention=(1,), emb_features=EMB, unshuffle=4, key=KEY
    )
    assert net.entries[0].in_channels == 16 and net.final.out_channels == 16
    x = jax.random.normal(KEY, (1, 32, 32))
    assert apply(net, x, emb()).shape == (1, 32, 32)


def test_pixel_shuffle_inverts_unshuffle():
    x = jnp.arange(2 * 8 * 12.0).reshape(2, 8, 12)
    y = pixel_unshuffle(x, 4)
    assert y.shape == (32, 2, 3)
    assert y[1 * 16 + 2 * 4 + 3, 1, 2] == x[1, 1 * 4 + 2, 2 * 4 + 3]
    np.testing.assert_array_equal(pixel_shuffle(y, 4), x)


def test_biases_zero_and_weights_bounded(unet):
    for net in (unet, MLP(5, key=KEY)):
        linears = layers(net, (eqx.nn.Linear, eqx.nn.Conv))
        assert linears
        for layer in linears:
            fan_in = layer.weight[0].size
            assert jnp.max(jnp.abs(layer.weight)) <= 1 / math.sqrt(fan_in)
            assert layer.bias is None or not jnp.any(layer.bias)


def test_layernorm_has_no_parameters():
    assert count_parameters(LayerNorm()) == 0
    x = jax.random.normal(KEY, (8, 3, 3)) * 5 + 2
    y = LayerNorm()(x)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(0), 1, atol=1e-5)


def test_modulation_last_weight_scaled(unet):
    modulations = layers(unet, Modulation)
    assert len(modulations) == 6  # level 0: 2 ResBlocks; level 1: 2 ResBlocks + 2 AttBlocks
    bound = 0.1 / math.sqrt(EMB)
    for mod in modulations:
        w = jnp.abs(mod.output.weight)
        assert jnp.max(w) <= bound and jnp.max(w) > 0.9 * bound
        assert jnp.max(jnp.abs(mod.hidden.weight)) > 0.9 / math.sqrt(EMB)


def test_blocks_near_identity(unet):
    res, att = unet.down[1]
    assert isinstance(res, ResBlock) and isinstance(att, AttBlock)
    x = jax.random.normal(KEY, (32, 4, 4))
    for block in (res, att):
        y = apply(block, x, emb())
        assert jnp.linalg.norm(y - x) / jnp.linalg.norm(x) < 0.02  # c ≈ 0.1 of its usual size


def test_dropout(unet):
    x, e = jax.random.normal(KEY, (3, 8, 8)), emb()
    np.testing.assert_array_equal(apply(unet, x, e), apply(unet, x, e))
    train_a = apply(unet, x, e, key(2))
    train_b = apply(unet, x, e, key(3))
    assert not jnp.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, apply(unet, x, e, key(2)))


def test_paper_configurations():
    """Sizes and output shapes of the paper's networks, traced abstractly (nothing allocated)."""
    assert count_parameters(MLP(5, key=KEY)) == pytest.approx(151e3, rel=5e-3)
    paper = [(cifar_unet, 57.6e6, (3, 32, 32)), (fastmri_unet, 77.6e6, (1, 320, 320))]
    for make, size, shape in paper:
        net = eqx.filter_eval_shape(make, key=KEY)
        assert count_parameters(net) == pytest.approx(size, rel=5e-3)
        x = jax.ShapeDtypeStruct(shape, float)
        e = jax.ShapeDtypeStruct((256,), float)
        assert eqx.filter_eval_shape(lambda net, x, e: net(x, e), net, x, e).shape == shape


def test_jit_vmap_grad(unet):
    xs = jax.random.normal(KEY, (4, 3, 8, 8))
    embs = jnp.stack([emb(seed) for seed in range(4)])
    keys = jax.random.split(key(4), 4)

    def loss(net):
        out = jax.vmap(lambda x, e, k: net(x, e, key=k))(xs, embs, keys)
        return jnp.mean((out - xs) ** 2)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(unet)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(jnp.all(jnp.isfinite(g)) for g in leaves)
    assert any(jnp.any(g != 0) for g in leaves)
