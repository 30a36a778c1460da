"""Hugging Face datasets: a ``datasets.load_dataset`` split read row by row, tokenized by a
``TextProcessor`` in the main process (``datasets`` is an optional dependency)."""
from __future__ import annotations

from typing import Iterator

from ml_collections import ConfigDict

from lwm.data.common import DataError, _update_config
from lwm.data.dataset import _Dataset, _Problem, _Wrap


class HuggingfaceDataset(_Dataset):
    """A ``datasets.load_dataset`` split (hub name, or a builder such as ``json`` / ``text``
    with ``data_files`` for local files), tokenized by a TextProcessor in the main process.

    ``datasets`` is imported only here (optional dependency). With data_world > 1, process
    data_rank keeps rows data_rank, data_rank + data_world, ... The state records the next row.
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = "c4"  # dataset name on the hub, a local folder, or a builder (json, text, csv, parquet)
        config.name = "en"  # dataset configuration name ('' for none)
        config.split = "train"
        config.streaming = False
        config.data_files = ""  # comma-separated files for builders such as json / text ('' for none)
        config.cache_dir = ""  # datasets cache folder ('' for the default)
        config.seq_length = 1024  # tokens per row
        config.batch_size = 8  # global rows per step, summed over the data-reading processes
        config.always_start_with_bos = False  # overwrite column 0 of input_tokens with BOS
        config.packed = False  # masked sequence packing instead of the concatenated stream
        config.throughput_average_window_size = 200  # batches averaged in dataset_average_tps
        return _update_config(config, updates)

    def __init__(self, config, tokenizer, text_processor, data_rank: int = 0, data_world: int = 1):
        self.config = self.get_default_config(config)
        self._layout_name = "packed" if self.config.packed else "stream"
        super().__init__(self.config, tokenizer, text_processor, data_rank, data_world, True)
        try:
            import datasets
        except ImportError:
            raise ImportError("huggingface_dataset needs the `datasets` package: pip install datasets") from None
        c = self.config
        files = [f.strip() for f in c.data_files.split(",") if f.strip()] or None
        if not c.split:
            raise ValueError("huggingface_dataset.split must name a split (e.g. 'train')")
        try:
            self._dataset = datasets.load_dataset(
                c.path, c.name or None, data_files=files, split=c.split, streaming=c.streaming,
                cache_dir=c.cache_dir or None)
        except Exception as e:
            cause = f"{type(e).__name__}: {e}" + (f" (caused by {type(e.__cause__).__name__}: {e.__cause__})"
                                                 if e.__cause__ else "")
            raise DataError(f"datasets.load_dataset could not load path={c.path!r} name={c.name!r} "
                            f"data_files={files} split={c.split!r}: {cause}. A JSONL file with malformed lines "
                            f"loads with type=json, which skips and reports them.", "malformed_json") from e
        self._source_label = f"huggingface dataset {c.path!r} ({c.name or '-'}, split {c.split!r})"

    @property
    def dataset(self):
        return self._dataset

    def _problem_where(self, index: int) -> str:
        return f"{self._source_label} row {index}"

    def _items(self) -> Iterator:
        start = self._next_index
        while True:
            rows = self._dataset.skip(start) if start > 0 else self._dataset
            index = start
            for example in rows:
                if index % self.data_world == self.data_rank:
                    try:
                        result = self._processor(dict(example), line_index=index)
                    except DataError as e:
                        result = _Problem(e.kind, str(e))
                    yield index, None, result
                index += 1
            yield None, None, _Wrap(start == 0, index - start)
            start = 0
