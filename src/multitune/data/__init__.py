"""Data preparation: readers for every format, cleaning, seeded sampling and splits.

:func:`load_task_data` runs the whole path for one task; the steps are public for tools and tests.
"""

from multitune.data.cleaning import clean_examples
from multitune.data.examples import CANONICAL_FIELDS, read_split
from multitune.data.loading import TaskData, load_task_data
from multitune.data.readers import EXTENSIONS, READERS, ReadContext, infer_format
from multitune.data.splits import sample_examples, split_examples

__all__ = [
    "CANONICAL_FIELDS",
    "EXTENSIONS",
    "READERS",
    "ReadContext",
    "TaskData",
    "clean_examples",
    "infer_format",
    "load_task_data",
    "read_split",
    "sample_examples",
    "split_examples",
]
