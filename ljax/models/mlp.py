"""BN-MLP: flatten, then [Dense - BatchNorm - ReLU] per hidden width, then a Dense classifier.

The offline default (Fashion-MNIST, 28x28x1 inputs): hidden=(768, 768) gives 1.19M params.
Param names: `dense{i}` / `bn{i}` for hidden layer i = 1, 2, ...; `classifier`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Input (batch, ...) float32, flattened per example; output (batch, num_classes)."""

    hidden: tuple[int, ...] = (768, 768)
    num_classes: int = 10
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden, start=1):
            x = nn.Dense(width, name=f'dense{i}')(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=0.9,
                epsilon=1e-5,
                axis_name=self.bn_axis_name,
                name=f'bn{i}',
            )(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes, name='classifier')(x)
