"""Per-user features: the raw state events build (``state``), the feature catalogue computed
from it (``catalogue``), and the in-memory feature store with its update records (``store``)."""
