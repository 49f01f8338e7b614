"""meg_jax: MeG massive knowledge editing (dynamic weight generation) in JAX/Flax."""
