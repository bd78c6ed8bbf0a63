"""Evaluation protocols (kNN, linear, low-shot, clustering), their metrics and the run report."""
