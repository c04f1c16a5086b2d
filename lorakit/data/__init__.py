"""Data: files to records, records to token ids + labels through a chat template, examples to batches.

```python
records = load_records("identity,alpaca_en_demo", dataset_dir="data", stage="sft", max_samples=None)
template = get_template(None, tokenizer)            # the tokenizer's own; or "chatml", "llama3", ...
examples, stats = encode_records(records, tokenizer, template, cutoff_len=1024)
train, val = split_validation(examples, val_size=0.1, seed=42)
rows = pack_examples(train, max_len=1024)           # optional: several examples per row
for batch in iterate_batches(rows, batch_size=4, pad_token_id=pad, seed=42, epoch=0, start=0):
    loss = model(**batch, use_cache=False).loss     # packed batches need use_cache=False (see batching)
```
"""

from .batching import (
    batch_order,
    collate_packed,
    iterate_batches,
    pack_examples,
    packed_attention_mask,
    pad_collate,
    split_validation,
)
from .encode import IGNORE_INDEX, encode_records, turn_budget
from .formats import DataError
from .sources import check_datasets, load_datasets, load_records, read_registry
from .templates import TEMPLATES, BuiltinTemplate, TokenizerTemplate, check_template, get_template

__all__ = [
    "DataError", "IGNORE_INDEX", "TEMPLATES", "BuiltinTemplate", "TokenizerTemplate", "batch_order",
    "check_datasets", "check_template", "collate_packed", "encode_records", "get_template", "iterate_batches",
    "load_datasets", "load_records", "pack_examples", "packed_attention_mask", "pad_collate", "read_registry",
    "split_validation", "turn_budget",
]
