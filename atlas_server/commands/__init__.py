"""Sub-commands of `atlas`, one module per family."""
