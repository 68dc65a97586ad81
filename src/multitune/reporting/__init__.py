"""What a run leaves for people to read: the HTML report of a run directory, and experiment trackers."""

from multitune.reporting.html import write_report

__all__ = ["write_report"]
