"""Flips and reflect-padded translations of the image M-steps (diemlib.data.augment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diemlib.data.augment import FlipTranslate


def images(batch=16, channels=3, size=6):
    return jnp.arange(batch * channels * size * size, dtype=jnp.float32).reshape(batch, channels, size, size)


def test_identity_without_flip_and_shift():
    x = images()
    assert jnp.array_equal(FlipTranslate(shift=0, flip_probability=0.0)(jax.random.key(0), x), x)


def test_flip_always_mirrors_left_right():
    x = images()
    out = FlipTranslate(shift=0, flip_probability=1.0)(jax.random.key(0), x)
    np.testing.assert_array_equal(out, x[..., ::-1])


def reflect_translations(image, shift):
    """Every crop of the reflect-padded image, by offset (dy, dx), written with numpy."""
    padded = np.pad(image, ((0, 0), (shift, shift), (shift, shift)), mode="reflect")
    H, W = image.shape[1:]
    return {
        (dy, dx): padded[:, dy : dy + H, dx : dx + W]
        for dy in range(2 * shift + 1)
        for dx in range(2 * shift + 1)
    }


@pytest.mark.parametrize("shift", [1, 2])
def test_translation_is_a_reflect_padded_crop_and_covers_every_offset(shift):
    x = images(batch=256)
    out = np.asarray(FlipTranslate(shift=shift, flip_probability=0.0)(jax.random.key(1), x))
    seen = set()
    for image, result in zip(np.asarray(x), out):
        matches = [o for o, crop in reflect_translations(image, shift).items() if np.array_equal(crop, result)]
        assert matches, "an output is not a reflect-padded crop of its input"
        seen.update(matches)
    assert len(seen) == (2 * shift + 1) ** 2  # all offsets drawn, identity included


def test_each_image_draws_its_own_flip_and_the_key_decides():
    x = jnp.broadcast_to(images(batch=1), (64, 3, 6, 6))
    augment = FlipTranslate(shift=1)
    out = augment(jax.random.key(2), x)
    distinct = {np.asarray(o).tobytes() for o in out}
    assert len(distinct) > 8  # 18 possible outcomes, 64 draws
    assert jnp.array_equal(out, augment(jax.random.key(2), x))


def test_flips_half_of_the_images():
    x = jnp.broadcast_to(images(batch=1), (512, 3, 6, 6))
    out = np.asarray(FlipTranslate(shift=0, flip_probability=0.5)(jax.random.key(3), x))
    mirrored = np.mean([np.array_equal(o, np.asarray(x[0])[..., ::-1]) for o in out])
    kept = np.mean([np.array_equal(o, np.asarray(x[0])) for o in out])
    assert mirrored + kept == 1.0
    assert 0.4 < mirrored < 0.6  # 512 draws: 4.5 standard deviations


def test_refuses_bad_arguments():
    with pytest.raises(ValueError):
        FlipTranslate(shift=-1)
    with pytest.raises(ValueError):
        FlipTranslate(flip_probability=1.5)
