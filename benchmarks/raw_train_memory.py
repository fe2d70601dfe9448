"""What keeping stage 1's Quora pairs as text (``TaskData.raw_train``) adds to a run's data.

A run reads Quora's training file once; stage 1 takes its pairs' text from ``TaskData.raw_train``
instead of reading the file again. The text is kept for Quora only and costs memory twice in a
search: once in the object store (the shared data, :func:`mtl.search.trainable.pack`) and once
per trial in the heap (unpickled strings are copied, tensors are views of one buffer). Measured
here against the baseline in the same run, the same data without ``raw_train``:

* ``store``: the pickled size of the packed TaskData (what Ray's object store holds), with and
  without ``raw_train``;
* ``heap``: the Python heap the kept RawSplit holds (tracemalloc over unpickling it alone),
  against the tensor bytes of the tokenized data.

All training rows of the files (``data.max_train_examples: null``), MiniLM's tokenizer, design 2,
``data.max_length`` 128, dev and test at 200 examples per task:

    python benchmarks/raw_train_memory.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import tracemalloc

from mtl.backbones import load_tokenizer, resolve_backbone
from mtl.config import DataConfig
from mtl.data import load_task_data, pack

MB = 1 << 20


def _tensor_bytes(data) -> int:
    total = 0
    for splits in (data.train, data.dev, data.test):
        for enc in splits.values():
            for value in (enc.input_ids, enc.token_type_ids, enc.input_ids_b):
                total += sum(t.numel() * t.element_size() for t in value or [])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("MTL_DATA_DIR"))
    args = parser.parse_args()
    cfg = DataConfig(
        data_dir=args.data_dir, max_train_examples=None, max_eval_examples=200, max_length=128
    )
    data = load_task_data(cfg, load_tokenizer(resolve_backbone("minilm")), design=2, seed=0)
    without = dataclasses.replace(data, raw_train={})
    store_with = len(pickle.dumps(pack(data), protocol=5))
    store_without = len(pickle.dumps(pack(without), protocol=5))
    blob = pickle.dumps(data.raw_train, protocol=5)
    tracemalloc.start()
    kept = pickle.loads(blob)
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pairs = {task: len(raw) for task, raw in kept.items()}
    tokens = _tensor_bytes(data)
    print(f"raw_train: {pairs} (Quora training pairs kept as text)")
    print(
        f"store: {store_with / MB:.1f} MB with, {store_without / MB:.1f} MB without "
        f"(x{store_with / store_without:.2f})"
    )
    print(
        f"heap per trial: {heap / MB:.1f} MB of text; the tokenized data's tensors "
        f"{tokens / MB:.1f} MB (text/tokens {heap / tokens:.2f})"
    )
    per_pair = heap / max(1, sum(pairs.values()))
    print(
        f"per Quora pair: {per_pair:.0f} B; all 141,506 published pairs: {per_pair * 141_506 / MB:.0f} MB"
    )


if __name__ == "__main__":
    main()
