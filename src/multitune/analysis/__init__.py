"""Transfer analysis: how the tasks of a run help or hurt each other.

- :mod:`multitune.analysis.affinity`: gradient cosine similarity and look-ahead task affinity (TAG), measured
  during training every ``analysis.affinity_every`` steps;
- :mod:`multitune.analysis.compare`: ``multitune compare``, the multi-task run against each task alone with the
  same budget, and task groups suggested from the affinities;
- :mod:`multitune.analysis.merge`: ``multitune merge``, the per-task LoRA adapters of a run merged into one and
  scored against each task's own.
"""
