"""Helpers of ``bench/perf.py``, the performance suite (multitune vs HF Trainer vs tasknet).

``common``: data preparation, machine facts, matmul peak, FLOPs, metrics, atomic files;
``hf``: HF Trainer runs (defaults and tuned) and HF pipelines; ``mt``: multitune runs, inference and
scaling curves; ``tn``: the tasknet mixture; ``report``: ratios, goals, markdown and plots.

(``bench/perf.py`` imports this package as ``perf``: a package directory wins over a module of the same name
on ``sys.path``.)
"""
