"""Data preparation: readers for every format, cleaning, seeded sampling and splits."""

from multitune.data.cleaning import clean_examples
from multitune.data.loading import TaskData, load_task_data
from multitune.data.readers import CANONICAL_FIELDS, READERS, read_split
from multitune.data.splits import sample_examples, split_examples

__all__ = ["CANONICAL_FIELDS", "READERS", "TaskData", "clean_examples", "load_task_data", "read_split",
           "sample_examples", "split_examples"]
