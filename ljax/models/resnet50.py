"""ResNet-50 in torchvision's layout (v1.5: the stride sits in the 3x3 conv of a bottleneck).

7x7/2 conv stem (padding 3) - BN - ReLU - 3x3/2 max-pool (padding 1); four stages of 3, 4, 6, 3
bottlenecks of widths 64, 128, 256, 512 (expansion 4); the first block of every stage has a
conv1x1-BN `downsample` shortcut; global average pool; `fc`. 25,557,032 params at 1000 classes.
Any input of at least 32x32 works (the pool is global).

Param names: `conv1`, `bn1`, `layer{s}_{b}` (s in 1..4, b from 0) holding `conv1..3`, `bn1..3`
and, in block 0, `downsample_conv` / `downsample_bn` (torch `downsample.0` / `downsample.1`); `fc`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ljax.models.layers import Conv

STAGES: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))  # (width, blocks)
EXPANSION = 4

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(train: bool, axis_name: str | None, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=axis_name, name=name
    )


def _conv(features: int, size: int, stride: int, name: str) -> Conv:
    # PyTorch pads size // 2 on every side; "SAME" with stride 2 would pad asymmetrically.
    pad = size // 2
    return Conv(
        features,
        (size, size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        name=name,
    )


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN (x4 channels), + shortcut, ReLU."""

    width: int
    stride: int = 1
    downsample: bool = False
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        axis = self.bn_axis_name
        y = nn.relu(_batch_norm(train, axis, 'bn1')(_conv(self.width, 1, 1, 'conv1')(x)))
        y = _conv(self.width, 3, self.stride, 'conv2')(y)
        y = nn.relu(_batch_norm(train, axis, 'bn2')(y))
        y = _batch_norm(train, axis, 'bn3')(_conv(self.width * EXPANSION, 1, 1, 'conv3')(y))
        if self.downsample:
            x = _conv(self.width * EXPANSION, 1, self.stride, 'downsample_conv')(x)
            x = _batch_norm(train, axis, 'downsample_bn')(x)
        return nn.relu(y + x)


class ResNet50(nn.Module):
    """torchvision ResNet-50. Input NHWC float32 (224x224 for ImageNet); output (batch, classes)."""

    num_classes: int = 1000
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = _conv(64, 7, 2, 'conv1')(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, 'bn1')(x))
        # flax pads max-pool windows with -inf, as PyTorch does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, (width, blocks) in enumerate(STAGES, start=1):
            for block in range(blocks):
                x = Bottleneck(
                    width,
                    stride=2 if stage > 1 and block == 0 else 1,
                    downsample=block == 0,
                    bn_axis_name=self.bn_axis_name,
                    name=f'layer{stage}_{block}',
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name='fc')(x)
