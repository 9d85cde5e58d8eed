"""RL core of papo_jax: rewards, advantages, losses (pure functions), train step.

Nothing is imported here on purpose: `papo_jax.rl.rewards` is imported by the
reward worker processes, which must start without pulling in JAX. Import the
submodules directly (`from papo_jax.rl import losses`).
"""
