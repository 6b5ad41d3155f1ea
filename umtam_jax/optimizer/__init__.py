"""The UMTAM optimizer (Algorithm 1) as Optax gradient transformations."""
