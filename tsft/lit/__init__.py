"""LightningModules: the shared base and one module per kind of task."""
