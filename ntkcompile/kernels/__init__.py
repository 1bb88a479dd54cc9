"""Evaluation of the Master Theorem: Gaussian expectations and covariance rules."""
