"""Deterministic sample data for the demo and the tests, generated from a small seed file."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa


def sample_reviews(rows: int = 240, seed: int = 7) -> pa.Table:
    """``rows`` product reviews with a known sentiment label, the same on every machine."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    data: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "reviews_seed.json").read_text())
    rng = random.Random(seed)
    ids, products, ratings, reviews, labels = [], [], [], [], []
    for i in range(rows):
        product = rng.choice(data["products"])
        label = "positive" if i % 2 == 0 else "negative"
        text = rng.choice(data[label]).format(p=product) + rng.choice(data["details"])
        ids.append(i + 1)
        products.append(product)
        ratings.append(rng.choice([4, 5]) if label == "positive" else rng.choice([1, 2]))
        reviews.append(text)
        labels.append(label)
    return pa.table(
        {
            "review_id": pa.array(ids, pa.int64()),
            "product": products,
            "rating": pa.array(ratings, pa.int32()),
            "review": reviews,
            "label": labels,
        }
    )


def write_sample_reviews(path: str, rows: int = 240, seed: int = 7) -> str:
    """Write the sample as a Delta table at ``path`` (replacing what is there); return the path."""
    from deltalake import write_deltalake

    from ai_query import storage

    write_deltalake(path, sample_reviews(rows, seed), mode="overwrite", schema_mode="overwrite",
                    storage_options=storage.delta_options(path))
    return path
