r"""Data augmentation of the image M-steps (paper §5.2-5.3): random flips and translations.

The E-step's posterior samples are the M-step's training set. Like the reference, the image
experiments augment every training batch with a horizontal flip (probability 1/2) and a random
translation by up to `shift` pixels in each direction, the border filled by reflection
(CIFAR-10: 1 pixel; MRI: 4 pixels). Each image draws its own flip and offsets.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class FlipTranslate(eqx.Module):
    r"""`augment(key, batch) -> batch` for batches of images `(B, C, H, W)`.

    An image is flipped left-right with probability `flip_probability`, then reflect-padded by
    `shift` pixels on every side and cropped back to `H × W` at an offset drawn uniformly in
    $\{0, \dots, 2\,\text{shift}\}^2$ (offset `shift` is the identity).

    **Arguments:**

    - `shift`: the largest translation in pixels (0: no translation).
    - `flip_probability`: the probability of a horizontal flip (0: never).
    """

    shift: int = eqx.field(static=True, default=1)
    flip_probability: float = eqx.field(static=True, default=0.5)

    def __check_init__(self):
        if self.shift < 0 or not 0 <= self.flip_probability <= 1:
            raise ValueError(f"need shift >= 0 and 0 <= flip_probability <= 1, got {self.shift}, {self.flip_probability}")

    def __call__(self, key: PRNGKeyArray, batch: Float[Array, "B C H W"]) -> Float[Array, "B C H W"]:
        keys = jax.random.split(key, batch.shape[0])
        return jax.vmap(self.one)(keys, batch)

    def one(self, key: PRNGKeyArray, x: Float[Array, "C H W"]) -> Float[Array, "C H W"]:
        """Augments one image."""
        key_flip, key_offset = jax.random.split(key)
        flip = jax.random.bernoulli(key_flip, self.flip_probability)
        x = jnp.where(flip, x[..., ::-1], x)
        if self.shift == 0:
            return x
        s = self.shift
        padded = jnp.pad(x, ((0, 0), (s, s), (s, s)), mode="reflect")
        dy, dx = jax.random.randint(key_offset, (2,), 0, 2 * s + 1)
        return jax.lax.dynamic_slice(padded, (0, dy, dx), x.shape)
