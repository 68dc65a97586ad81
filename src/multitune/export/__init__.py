"""Models that leave multitune: each task as the stock transformers model its users' tools load, the
sentence-transformers layout of encoder models, and the model class shipped with exports whose head no stock
class computes. See docs/export.md."""
