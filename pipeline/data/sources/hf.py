"""Hugging Face datasets (the [hf] extra): rows streamed by `datasets.load_dataset`, from the hub or
from local files, as records."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.common import PipelineError, first_line
from pipeline.core.params import Source
from pipeline.data.sources.records import named_columns, record


def records_from_hf(src: Source, stats: Counter) -> Iterator[dict]:
    """Rows of a Hugging Face dataset, streamed (never held in memory or converted to a cache)."""
    try:
        import datasets
    except ImportError:
        raise PipelineError(
            f"source '{src.name}': kind 'hf' needs the datasets library: pip install -e \".[hf]\""
        ) from None
    datasets.disable_progress_bars()
    where = f"source '{src.name}' (dataset {src.dataset!r})"
    files = [str(Path(os.path.expanduser(f))) for f in src.data_files]
    for pattern in files:
        if not glob.glob(pattern):
            raise PipelineError(f"{where}: no file matches data_files '{pattern}'")
    try:
        rows = iter(
            datasets.load_dataset(
                src.dataset,
                src.config or None,
                data_files=files or None,
                split=src.hf_split,
                revision=src.revision or None,
                streaming=True,
            )
        )
        columns = named_columns(src)
        for i, row in enumerate(rows):
            stats["rows"] += 1
            yield record(row, columns, src.dataset, f"{where} row {i}")
    except PipelineError:
        raise
    except Exception as e:  # datasets/fsspec/pyarrow errors: one line naming the source
        raise PipelineError(f"{where}: cannot read it ({first_line(e)})") from None
