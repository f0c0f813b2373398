"""The trained yardstick: a procedural shapes dataset, its checker, and the small model trained on it."""
