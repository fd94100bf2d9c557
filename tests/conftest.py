"""Test set-up: 4 virtual CPU devices, so that every pmap path runs data-parallel here.

XLA_FLAGS must be set before jax is imported; conftest is imported before any test module.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
