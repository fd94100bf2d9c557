"""Test set-up: 4 virtual CPU devices, so that every pmap path runs data-parallel here.

XLA_FLAGS must be set before jax is imported; conftest is imported before any test module.
"""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


def _mappings() -> int:
    try:
        with open('/proc/self/maps') as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _map_limit() -> int:
    try:
        with open('/proc/sys/vm/max_map_count') as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    """XLA:CPU maps each compiled program's code into the process: about 200 mappings for a
    `topk_masks` of two layers (measured: 12 compilations, 458 -> 3,025 mappings; after
    `jax.clear_caches()` 548). The suite compiles thousands of programs in one process, past
    the kernel's limit per process (vm.max_map_count, 65,530 here); LLVM then fails to allocate
    and the run segfaults (CI in session 14, inside a compilation at about 90% of the suite).
    After a test, JAX's caches are cleared once the mappings pass half the limit."""
    yield
    if _mappings() > _map_limit() // 2:
        import jax

        jax.clear_caches()
