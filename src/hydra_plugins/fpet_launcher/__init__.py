"""fpet's Hydra launcher plugin (`hydra/launcher=local`): Hydra looks for launchers in the `hydra_plugins` namespace."""
