"""umtam_jax: UMTAM training and model merging for JAX/Optax."""
