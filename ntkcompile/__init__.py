"""ntkcompile: compile a PyTorch module into its infinite-width NNGP and NTK."""
