import os

from papo_jax.workdir import cache_root  # noqa: E402  (no jax import)

# 8 fake CPU devices for the sharding tests; must be set before jax is imported.
# LLVM's optimisation level 0: tiny programs whose compile time dominates their run time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for every test process and the training runs they start
# (xdist workers and subprocesses inherit it): a program compiled once is loaded after that.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache_root(), "xla-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
