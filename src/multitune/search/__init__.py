"""Hyperparameter search over config fields with Optuna (needs ``multitune[search]``)."""

from multitune.search.space import Parameter, SearchSpace, load_space
from multitune.search.study import SearchResult, run_search

__all__ = ["Parameter", "SearchResult", "SearchSpace", "load_space", "run_search"]
