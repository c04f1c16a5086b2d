"""`lorakit estimate`: before training, from the model's config alone (built on the meta device), the peak memory
by part, the time, whether the run fits a device and what to change if not, and rank/method advice."""

from .devices import Device, find_device
from .plan import Estimate, config_for_keys, estimate, estimate_for_keys, train_summary
from .report import as_json, summary, table

__all__ = ["Device", "Estimate", "as_json", "config_for_keys", "estimate", "estimate_for_keys", "find_device",
           "summary", "table", "train_summary"]
