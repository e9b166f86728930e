"""Formulas over accuracies, kept as plain functions and data: the Visual Decathlon score with
the paper's published numbers (``decathlon``) and the continual-learning measures
(``continual``: accuracy matrix, BWT, forgetting). Knows nothing of models."""
