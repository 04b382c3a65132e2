r"""The M-step of DiEM (Algorithm 1): train the denoiser on the E-step's posterior samples.

Warm-started from the previous lap's weights (the EMA weights when there is an EMA), with a
fresh Adam state every lap, on the denoising loss of §2 (EDM weighting).
"""

from collections.abc import Callable
from typing import Literal

import equinox as eqx
from jaxtyping import Array, PRNGKeyArray

from .distributed import gather
from .sharding import batch_sharding, replicate
from .training import TrainState, fit, optimizer


class MStep(eqx.Module):
    """How the denoiser is trained on posterior samples (docs/conventions.md, 'Training loss' and
    'Optimiser and EMA').

    **Arguments:**

    - `steps`, `batch_size`: Adam steps per lap and examples per step (drawn with replacement).
    - `learning_rate`, `schedule`, `final_learning_rate`, `clip`: see [`optimizer`][].
    - `ema_decay`: EMA of the weights (`None`: no EMA). With EMA, the next lap starts from
      and samples with the EMA weights.
    - `augment`: `augment(key, batch) -> batch` (flips, translations) or `None`.
    """

    steps: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    learning_rate: float = eqx.field(static=True)
    schedule: Literal["constant", "linear"] = eqx.field(static=True, default="constant")
    final_learning_rate: float = eqx.field(static=True, default=1e-6)
    clip: float = eqx.field(static=True, default=1.0)
    ema_decay: float | None = eqx.field(static=True, default=None)
    augment: Callable | None = eqx.field(static=True, default=None)

    def optimizer(self):
        return optimizer(
            self.learning_rate,
            steps=self.steps,
            schedule=self.schedule,
            final_learning_rate=self.final_learning_rate,
            clip=self.clip,
        )


def maximize(
    key: PRNGKeyArray, model, samples: Array, mstep: MStep, step_fn, desc: str = "M-step"
) -> tuple[eqx.Module, Array]:
    r"""The M-step: `mstep.steps` Adam steps on the denoising loss over `samples`, Adam state fresh.

    **Returns:** the model the next lap starts from (the EMA weights if `mstep.ema_decay`, else
    the raw weights) and the loss of every step.
    """
    state = TrainState.create(model, mstep.optimizer(), ema=mstep.ema_decay is not None)
    # Several processes: the state, the samples and the key on every device of every process;
    # each step's batch is split over them all (data parallel over the global mesh).
    state, samples, key = replicate((state, samples, key))
    state, losses = fit(
        state,
        samples,
        key,
        steps=mstep.steps,
        batch_size=mstep.batch_size,
        step_fn=step_fn,
        augment=mstep.augment,
        sharding=batch_sharding(),
        desc=desc,
    )
    model = gather(state.model if state.ema is None else state.ema)  # local arrays again
    return model, losses
