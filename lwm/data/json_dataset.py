"""JSONL datasets: one JSON example per line, read from the saved byte offset, tokenized in
file order (in the main process or in spawned worker processes), each process reading its
own lines. ``JsonDataset`` takes text examples, ``JsonVisionDataset`` pre-tokenized vision codes.
"""
from __future__ import annotations

import collections
import json
import logging
import multiprocessing
import os
from typing import Iterator

from ml_collections import ConfigDict

from lwm import storage
from lwm.data.common import DataError, _update_config
from lwm.data.dataset import _Blank, _Dataset, _Problem, _Wrap

logger = logging.getLogger(__name__)

# Tokenizer workers are spawned, never forked: the parent usually runs JAX, whose threads
# make fork unsafe. A spawned worker rebuilds the tokenizer from its model file.
WORKER_START_METHOD = "spawn"

# The processor of this worker process, set once by the pool's initializer.
_WORKER_PROCESSOR = None


def _init_worker(processor) -> None:
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor


def _process_line(processor, item):
    """(index, end_loc, raw bytes) -> ProcessedExample | _Problem | _Blank; markers pass through."""
    if isinstance(item, _Wrap):
        return item
    index, _, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Problem("malformed_json", f"not valid UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return _Blank()
    try:
        example = json.loads(text)
    except json.JSONDecodeError as e:
        return _Problem("malformed_json", f"invalid JSON ({e.msg} at column {e.colno}): {text.strip()[:120]!r}")
    try:
        return processor(example, line_index=index)
    except DataError as e:
        return _Problem(e.kind, str(e))


def _process_line_in_worker(item):
    return _process_line(_WORKER_PROCESSOR, item)


def _chunks(iterator: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = [next(iterator) for _ in range(size)]
        yield chunk


def _reader_defaults(config: ConfigDict) -> None:
    """The reading, resuming and tokenizing fields both JSON datasets share (same defaults)."""
    config.always_start_with_bos = False  # overwrite column 0 of input_tokens with BOS
    config.start_seek_loc = 0  # byte offset of the first line to read
    config.example_index_at_start = 0  # line index of the line at start_seek_loc
    config.tokens_count_at_start = 0  # initial value of dataset_total_tokens
    config.tokenizer_processes = 1  # > 1: tokenize in that many worker processes
    config.tokenizer_parallel_chunk_size = 32  # lines per task sent to a worker
    config.tokenizer_parallel_batch_size = 1024  # lines read ahead per round of tasks
    config.throughput_average_window_size = 200  # batches averaged in dataset_average_tps


# json_dataset.packed_loss_weighting -> the layout (lwm.data.layouts) that packs with it
PACKED_WEIGHTINGS = {"example": "packed", "token": "packed_per_token"}

class JsonDataset(_Dataset):
    """Newline-delimited JSON, one example per line, tokenized by a (Vision)TextProcessor.

    Process ``data_rank`` of ``data_world`` reads lines data_rank, data_rank + data_world, ...
    (0-based line indices; when use_data_sharded_loader is on) and yields batches of
    batch_size // data_world rows. Tokenization can run in ``tokenizer_processes`` spawned
    workers; results are consumed in file order, so batches do not depend on the count.
    """

    _layout_name = "stream"

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = ""  # the .jsonl file (local path, or an fsspec URL such as gs://...)
        config.seq_length = 1024  # tokens per row
        config.batch_size = 8  # global rows per step, summed over the data-reading processes
        _reader_defaults(config)
        config.pad = False  # one example per row (truncated, padded) instead of a stream
        config.packed = False  # masked sequence packing (see Packer); excludes pad
        # packed rows' loss weights: "example" (each example's targets share a weight of 1, as LWM packs) or
        # "token" (every loss-bearing target weighs 1, so an example with more answers counts for more)
        config.packed_loss_weighting = "example"
        config.use_data_sharded_loader = True  # each data-reading process reads its own lines
        config.return_local_batch = False  # read by the trainer: keep batches host-local
        return _update_config(config, updates)

    def __init__(self, config, tokenizer, text_processor, data_rank: int = 0, data_world: int = 1):
        self.config = self.get_default_config(config)
        self._set_layout()
        if not self.config.path:
            raise ValueError(f"{type(self).__name__}: set path to a JSONL file")
        if not storage.isfile(self.config.path):
            raise FileNotFoundError(f"{type(self).__name__}: no such file: {self.config.path}")
        super().__init__(self.config, tokenizer, text_processor, data_rank, data_world,
                         self.config.use_data_sharded_loader)
        self._file_loc = int(self.config.start_seek_loc)
        self._next_index = int(self.config.example_index_at_start)
        self._last_index = self._next_index - 1
        self._total_tokens = int(self.config.tokens_count_at_start)
        self._source_label = self.config.path

    def _set_layout(self) -> None:
        if self.config.pad and self.config.packed:
            raise ValueError("json_dataset: pad and packed are exclusive; choose one")
        if self.config.packed_loss_weighting not in PACKED_WEIGHTINGS:
            raise ValueError(f"json_dataset.packed_loss_weighting={self.config.packed_loss_weighting!r}; expected one "
                             f"of {', '.join(PACKED_WEIGHTINGS)}")
        packed = PACKED_WEIGHTINGS[self.config.packed_loss_weighting]
        self._layout_name = packed if self.config.packed else "pad" if self.config.pad else "stream"

    def _problem_where(self, index: int) -> str:
        return f"{self.config.path} line {index + 1}"

    def _lines(self) -> Iterator:
        """(index, end_loc, raw) of this rank's lines from the saved position, then _Wrap at each EOF."""
        with storage.open_file(self.config.path, "rb") as f:
            f.seek(self._file_loc)
            index, from_start, n_read = self._next_index, self._file_loc == 0, 0
            while True:
                raw = f.readline()
                if not raw:
                    yield _Wrap(from_start, n_read)
                    f.seek(0)
                    index, from_start, n_read = 0, True, 0
                    continue
                n_read += 1
                if index % self.data_world == self.data_rank:
                    yield index, f.tell(), raw
                index += 1

    def _items(self) -> Iterator:
        lines = self._lines()
        # More workers than cores only adds start-up (each loads the tokenizer): the original
        # scripts' 16 cost 36 s on 2 cores. The stream is the same for any count.
        n_procs = min(self.config.tokenizer_processes, os.cpu_count() or 1)
        if n_procs < self.config.tokenizer_processes:
            logger.info("tokenizer_processes=%d capped at the %d cores of this host", self.config.tokenizer_processes,
                     n_procs)
        if n_procs <= 1:
            for item in lines:
                result = _process_line(self._processor, item)
                yield (None, None, result) if isinstance(item, _Wrap) else (item[0], item[1], result)
            return
        # Workers tokenize rounds of tokenizer_parallel_batch_size lines; two rounds stay in flight and
        # results come back in submission order, so the stream is the same as with one process.
        ctx = multiprocessing.get_context(WORKER_START_METHOD)
        rounds = _chunks(lines, max(1, self.config.tokenizer_parallel_batch_size))
        chunk = max(1, self.config.tokenizer_parallel_chunk_size)
        with ctx.Pool(n_procs, initializer=_init_worker, initargs=(self._processor,)) as pool:
            in_flight = collections.deque()
            for _ in range(2):
                items = next(rounds)
                in_flight.append((items, pool.map_async(_process_line_in_worker, items, chunksize=chunk)))
            while True:
                items, pending = in_flight.popleft()
                results = pending.get()
                nxt = next(rounds)
                in_flight.append((nxt, pool.map_async(_process_line_in_worker, nxt, chunksize=chunk)))
                for item, result in zip(items, results):
                    yield (None, None, result) if isinstance(item, _Wrap) else (item[0], item[1], result)


class JsonVisionDataset(JsonDataset):
    """JSONL with pre-tokenized vision codes, processed by a VisionTextProcessor.

    ``mode``: ``pad`` (one example per row, the original default), ``no_pad`` (examples
    concatenated into a stream) or ``packed`` (masked sequence packing).
    """

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.path = ""  # the .jsonl file (local path, or an fsspec URL)
        config.seq_length = 384  # tokens per row
        config.batch_size = 4  # global rows per step, summed over the data-reading processes
        _reader_defaults(config)
        config.use_data_sharded_loader = True  # each data-reading process reads its own lines
        config.return_local_batch = False  # read by the trainer: keep batches host-local
        config.mode = "pad"  # pad | no_pad | packed
        config.packed_loss_weighting = "example"  # mode=packed: "example" (as LWM packs) or "token", as json_dataset
        return _update_config(config, updates)

    def _set_layout(self) -> None:
        modes = {"pad": "pad", "no_pad": "stream", "packed": "packed"}
        if self.config.mode not in modes:
            raise ValueError(f"json_vision_dataset.mode must be one of {sorted(modes)}, got {self.config.mode!r}")
        if self.config.packed_loss_weighting not in PACKED_WEIGHTINGS:
            raise ValueError(f"json_vision_dataset.packed_loss_weighting={self.config.packed_loss_weighting!r}; "
                             f"expected one of {', '.join(PACKED_WEIGHTINGS)}")
        packed = PACKED_WEIGHTINGS[self.config.packed_loss_weighting]
        self._layout_name = packed if self.config.mode == "packed" else modes[self.config.mode]
