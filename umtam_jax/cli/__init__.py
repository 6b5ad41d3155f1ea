"""Command-line tools: ``umtam-merge`` (merge checkpoints) and ``umtam-demo``."""
