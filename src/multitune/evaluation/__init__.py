"""Evaluation of every task of a model, and plots of the results."""

from multitune.evaluation.evaluator import evaluate_task, selection_value

__all__ = ["evaluate_task", "selection_value"]
