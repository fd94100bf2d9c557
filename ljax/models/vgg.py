"""VGG-19 for CIFAR as in the authors' code (zyxxmu/lottery-jackpots, models/vgg_cifar.py).

16 conv3x3(no bias)-BN-ReLU layers in five blocks, a 2x2 max-pool after each block, then a
classifier on the 512-d features. Their classifier is a 1x1 convolution with bias applied after an
`AvgPool2d(1)` (an identity) on the 1x1 map that 32x32 inputs leave; here it is a `Dense` named
`classifier` after a global average pool, which is the same computation at 32x32 and still
defined at other sizes.

Param names: block b (1..5), layer j in the block -> `conv{b}_{j}` / `bn{b}_{j}`; the torch key
`features.{i}` of each is given by `ljax.convert`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ljax.models.layers import Conv

# Channels per conv layer, one tuple per block; a 2x2 max-pool follows every block.
VGG19_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256, 256),
    (512, 512, 512, 512),
    (512, 512, 512, 512),
)

# Kaiming-normal on fan-out, the usual PyTorch initialisation of ReLU convnets.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(train: bool, axis_name: str | None, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, name=name
    )


class VGG19Cifar(nn.Module):
    """VGG-19 (CIFAR layout). Input NHWC float32 (32x32 for CIFAR); output (batch, num_classes)."""

    num_classes: int = 10
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for block, widths in enumerate(VGG19_BLOCKS, start=1):
            for layer, width in enumerate(widths, start=1):
                x = Conv(
                    width,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    use_bias=False,
                    kernel_init=_conv_init,
                    name=f'conv{block}_{layer}',
                )(x)
                x = _batch_norm(train, self.bn_axis_name, f'bn{block}_{layer}')(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name='classifier')(x)
