"""Tests of the networks of docs/conventions.md, 'Networks': shapes, initialisation, dropout, sizes, gradients."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.nn.layers import LayerNorm, Modulation, conv, count_parameters
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


def _uniform_law(weights, bound, name):
    """`weights` look like i.i.d. U(-bound, bound): inside the bound, mean 0, std bound / sqrt(3)
    (relative standard error sqrt(0.2 / n) for a uniform), not all zero."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    n = w.size
    assert np.max(np.abs(w)) <= bound, name
    assert np.max(np.abs(w)) > 0.5 * bound, name  # not all zero, not shrunk
    assert abs(w.mean()) < 5 * bound / np.sqrt(3 * n), name
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 5 * np.sqrt(0.2 / n) + 1e-3, (name, w.std(), bound)


def test_initialisation_is_uniform_in_one_over_sqrt_fan_in_with_zero_bias(unet):
    """Every Linear and Conv weight ~ U(±1/sqrt(fan_in)) (fan_in = in_features, or in_channels k²),
    every bias exactly 0 (the attention output projection has none), and the modulation MLPs'
    output weights ~ U(±0.1/sqrt(fan_in)). Pooled over all layers, the normalised weights w / bound
    have the quantiles of U(-1, 1)."""
    for net in (unet, MLP(5, key=KEY)):
        scaled = {id(m.output) for m in layers(net, Modulation)}
        attention_out = {id(m.out) for m in layers(net, AttBlock)}
        linears = layers(net, (eqx.nn.Linear, eqx.nn.Conv))
        assert len(linears) > 3
        pooled = []
        for i, layer in enumerate(linears):
            fan_in = math.prod(layer.weight.shape[1:])
            bound = (0.1 if id(layer) in scaled else 1.0) / math.sqrt(fan_in)
            _uniform_law(layer.weight, bound, f"{type(layer).__name__} {i} {layer.weight.shape}")
            pooled.append(np.ravel(layer.weight) / bound)
            if id(layer) in attention_out:
                assert layer.bias is None
            else:
                assert layer.bias is not None and layer.bias.size == layer.weight.shape[0]
                np.testing.assert_array_equal(layer.bias, 0.0)
        pooled = np.concatenate(pooled)
        levels = np.linspace(0.05, 0.95, 19)
        np.testing.assert_allclose(np.quantile(pooled, levels), 2 * levels - 1, atol=0.03)


def test_layernorm_has_no_parameters():
    assert count_parameters(LayerNorm()) == 0
    x = jax.random.normal(KEY, (3, 3, 8)) * 5 + 2  # channels last
    y = LayerNorm()(x)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_channels_last_conv_equals_equinox_conv(stride):
    """Our Conv2d on (H, W, C) is equinox's Conv2d on (C, H, W), with the same weights."""
    layer = conv(4, 6, stride=stride, key=KEY)
    layer = eqx.tree_at(lambda l: l.bias, layer, jax.random.normal(key(1), layer.bias.shape))
    reference = eqx.nn.Conv2d(4, 6, 3, stride, padding=1, key=KEY)
    reference = eqx.tree_at(lambda l: (l.weight, l.bias), reference, (layer.weight, layer.bias))
    x = jax.random.normal(key(2), (4, 9, 8))
    np.testing.assert_allclose(layer(x.transpose(1, 2, 0)), reference(x).transpose(1, 2, 0), rtol=1e-10, atol=1e-12)


def _equinox_twin(layer):
    """equinox's Conv2d (XLA's own convolution and gradients, channels first) with `layer`'s weights."""
    k = layer.kernel_size[0]
    reference = eqx.nn.Conv2d(layer.in_channels, layer.out_channels, k, layer.stride, padding=k // 2, key=KEY)
    return eqx.tree_at(lambda l: (l.weight, l.bias), reference, (layer.weight, layer.bias))


@pytest.mark.parametrize("stride, height, kernel", [(1, 9, 3), (2, 9, 3), (2, 8, 3), (1, 6, 1)])
def test_channels_last_conv_gradients_equal_equinox_conv(stride, height, kernel):
    """On the CPU our VJP is a convolution for the input and a matmul per kernel tap for the
    kernel, over the batch: its gradients (input, kernel, bias) equal those of equinox's
    convolution, for odd and even sizes at stride 2 and a 1×1 kernel."""
    layer = conv(4, 6, kernel_size=kernel, stride=stride, key=KEY)
    reference = _equinox_twin(layer)
    x = jax.random.normal(key(1), (3, 4, height, 7))
    ours = eqx.filter_grad(lambda mx: jnp.sum(jnp.sin(jax.vmap(mx[0])(mx[1].transpose(0, 2, 3, 1)))))((layer, x))
    theirs = eqx.filter_grad(lambda mx: jnp.sum(jnp.sin(jax.vmap(mx[0])(mx[1]).transpose(0, 2, 3, 1))))((reference, x))
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours[0].weight, theirs[0].weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours[0].bias, theirs[0].bias, rtol=1e-10, atol=1e-12)


def test_conv_gradients_with_batched_kernels():
    """`vmap` over kernels too (an ensemble of layers), one image per kernel or one image for all:
    the gradients are per kernel, as equinox's."""
    layers_ = eqx.filter_vmap(lambda k: conv(4, 6, key=k))(jax.random.split(KEY, 3))
    references = eqx.filter_vmap(_equinox_twin)(layers_)
    x = jax.random.normal(key(1), (3, 4, 8, 7))
    for in_axes in (0, None):
        data = x if in_axes == 0 else x[0]
        ours = eqx.filter_grad(lambda ls: jnp.sum(jnp.sin(eqx.filter_vmap(lambda l, z: l(z.transpose(1, 2, 0)), in_axes=(eqx.if_array(0), in_axes))(ls, data))))(layers_)
        theirs = eqx.filter_grad(lambda ls: jnp.sum(jnp.sin(eqx.filter_vmap(lambda l, z: l(z).transpose(1, 2, 0), in_axes=(eqx.if_array(0), in_axes))(ls, data))))(references)
        np.testing.assert_allclose(ours.weight, theirs.weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float64, 1e-10), (jnp.float32, 2e-4)])
def test_unet_gradients_equal_xla_convolutions(dtype, tolerance, monkeypatch):
    """A denoising loss's gradients through a whole U-Net (stride-2 entries, merges of skips, the
    1×1 output, dropout) with our CPU convolution equal those with XLA's own convolution and its
    autodiff (the other backends' path), within the round-off of `dtype`."""
    net = UNet(3, 3, widths=(8, 16), blocks=(1, 1), attention=(1,), emb_features=EMB, unshuffle=2, key=KEY)
    net = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, net)
    xs = jax.random.normal(key(1), (4, 3, 16, 16), dtype)
    embs = jax.random.normal(key(2), (4, EMB), dtype)
    keys = jax.random.split(key(3), 4)

    @eqx.filter_grad
    def grads(net):
        out = jax.vmap(lambda x, e, k: net(x, e, key=k))(xs, embs, keys)
        return jnp.mean((out - xs) ** 2)

    ours = grads(net)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Conv2d takes XLA's own path
    theirs = grads(net)
    for a, b in zip(jax.tree.leaves(eqx.filter(ours, eqx.is_inexact_array)), jax.tree.leaves(eqx.filter(theirs, eqx.is_inexact_array))):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(b))))


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
    x = jax.random.normal(KEY, (4, 4, 32))  # blocks act on channels-last images
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


# Exact parameter counts from the architecture of the paper (Appendix D), layer by layer: every
# Linear and Conv has weights and a bias; LayerNorm has no parameters.


def conv_count(c_in, c_out, k):
    return c_out * c_in * k * k + c_out


def linear_count(n_in, n_out, bias=True):
    return n_out * n_in + (n_out if bias else 0)


def modulation_count(c, e):
    """Linear(E -> E), SiLU, Linear(E -> 3C)."""
    return linear_count(e, e) + linear_count(e, 3 * c)


def resblock_count(c, e):
    """Modulation, LN, Conv3x3(C -> C), SiLU, Dropout, Conv3x3(C -> C)."""
    return modulation_count(c, e) + 2 * conv_count(c, c, 3)


def attblock_count(c, e):
    """Modulation, LN, QKV projection Linear(C -> 3C) with bias, output Linear(C -> C) without."""
    return modulation_count(c, e) + linear_count(c, 3 * c) + linear_count(c, c, bias=False)


def unet_count(c_in, c_out, widths, blocks, attention, e, r=1):
    """Entry Conv3x3(r² C_in -> C_0); at level i > 0 a stride-2 Conv3x3(C_(i-1) -> C_i); B_i
    ResBlocks (each followed by an AttBlock at attention levels) in the descent and again in the
    ascent; a Conv3x3(C_i + C_(i+1) -> C_i) merging the skip at every level but the deepest; a final
    per-pixel Conv1x1(C_0 -> r² C_out)."""
    total = conv_count(c_in * r * r, widths[0], 3) + conv_count(widths[0], c_out * r * r, 1)
    for i, (c, b) in enumerate(zip(widths, blocks)):
        if i > 0:
            total += conv_count(widths[i - 1], c, 3)
        if i + 1 < len(widths):
            total += conv_count(c + widths[i + 1], c, 3)
        per_block = resblock_count(c, e) + (attblock_count(c, e) if i in attention else 0)
        total += 2 * b * per_block
    return total


def test_exact_parameter_counts_of_the_paper_networks():
    """The manifold MLP, the CIFAR-10 U-Net and the fastMRI U-Net (traced abstractly: nothing is
    allocated) have exactly the parameters of the layer list above, which is also about the
    paper's sizes (151 k, 57.6 M, 77.6 M). One missing 3x3 conv anywhere changes the count."""
    mlp = linear_count(5 + 64, 256) + 2 * linear_count(256, 256) + linear_count(256, 5)
    assert count_parameters(MLP(5, key=KEY)) == mlp
    assert mlp == pytest.approx(151e3, rel=5e-3)
    cifar = unet_count(3, 3, (128, 256, 384), (5, 5, 5), (1,), 256)
    fastmri = unet_count(1, 1, (128, 256, 384, 512), (3, 3, 3, 3), (3,), 256, r=4)
    assert cifar == pytest.approx(57.6e6, rel=5e-3) and fastmri == pytest.approx(77.6e6, rel=5e-3)
    for make, count, shape in [(cifar_unet, cifar, (3, 32, 32)), (fastmri_unet, fastmri, (1, 320, 320))]:
        net = eqx.filter_eval_shape(make, key=KEY)
        assert count_parameters(net) == count, make.__name__
        x = jax.ShapeDtypeStruct(shape, float)
        e = jax.ShapeDtypeStruct((256,), float)
        assert eqx.filter_eval_shape(lambda net, x, e: net(x, e), net, x, e).shape == shape


def test_exact_parameter_count_of_the_test_unet(unet):
    """The same formula on the small U-Net of these tests (two levels, attention at level 1)."""
    assert count_parameters(unet) == unet_count(3, 3, (16, 32), (1, 1), (1,), EMB)


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
