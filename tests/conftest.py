import os
import sys

import pytest

# Tests import the shared tiny models as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")


# The suite compiles the same tiny programs hundreds of times (every fit of the same model
# and options, in both xdist workers): jax's persistent compilation cache, every program in
# it, makes the suite about twice as fast on 2 cores. In the repo (ignored by git), so that a
# second ``make test`` starts warm. Only the pytest processes use it (child processes compile
# for themselves: a child killed in a write would leave a torn entry), and their writes are
# atomic (jax's are not: a worker could read the other's entry half-written).
# ``NNXFIT_TEST_JAX_CACHE=0`` turns it off; a test about the cache sets its own folder.
def _compilation_cache(path: str) -> None:
    import jax
    from jax._src import lru_cache

    def put(self, key: str, value: bytes) -> None:
        target = os.fspath(self.path / f"{key}{lru_cache._CACHE_SUFFIX}")
        if os.path.exists(target):
            return
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, target)

    lru_cache.LRUCache.put = put
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("NNXFIT_TEST_JAX_CACHE", "1") == "1":
    _compilation_cache(os.path.join(_ROOT, ".cache", "jax-tests"))


@pytest.fixture
def cold_compiles():
    """For a test about compiling itself: jax's persistent cache off while it runs."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", on)
    compilation_cache.reset_cache()
