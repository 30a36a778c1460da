"""The loop every dataset shares: source items -> layout -> (batch, metrics), with exact resume.

A subclass (``JsonDataset``, ``HuggingfaceDataset``) supplies ``_items()``: an endless stream
of processed examples in source order, with markers for problems, blank lines and the end
of each pass. ``_Dataset`` lays them into rows, counts and reports problems, computes the
metrics, and saves / restores its position and partial batch (``get_state_dict``,
``load_state_dict``, also an original LWM ``dataset.pkl``).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from typing import Any, Iterator

import numpy as np

from lwm.data.common import PROBLEM_KINDS, DataError
from lwm.data.layouts import _LAYOUTS

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
MAX_LOGGED_PROBLEMS = 100  # per dataset object; later problems are logged every 10,000th


# What _items() yields besides processed examples. Results cross process boundaries, so the
# markers are types, not identities.
@dataclasses.dataclass
class _Wrap:
    """End of one pass over the source; ``from_start`` when the pass began at its first line."""

    from_start: bool
    n_read: int  # lines (rows) read in this pass, all ranks


@dataclasses.dataclass
class _Problem:
    """A bad example: ``kind`` (one of PROBLEM_KINDS) names its counter, ``message`` says why."""

    kind: str
    message: str


@dataclasses.dataclass
class _Blank:
    """A blank line (counted, not reported)."""


class _Dataset:
    """Shared loop of the datasets: source items -> layout -> (batch, metrics), with state.

    Subclasses set ``self.config``, ``self._processor``, ``self._layout_name`` and implement
    ``_items()``: an endless iterator of (index, loc, result) in source order, where result is
    a ProcessedExample, a _Problem, a _Blank or a _Wrap marker (index, loc = None).
    """

    _source_label = "source"

    def __init__(self, config, tokenizer, processor, data_rank: int, data_world: int, sharded: bool):
        self._tokenizer = tokenizer
        self._processor = processor
        if data_world < 1 or not 0 <= data_rank < data_world:
            raise ValueError(f"data_rank={data_rank} must lie in [0, data_world={data_world})")
        self.sharded = bool(sharded and data_world > 1)
        self.data_rank, self.data_world = (data_rank, data_world) if self.sharded else (0, 1)
        c = self.config
        if c.seq_length <= 0 or c.batch_size <= 0:
            raise ValueError(f"seq_length={c.seq_length} and batch_size={c.batch_size} must be positive")
        if self.sharded and c.batch_size % data_world:
            raise ValueError(f"batch_size={c.batch_size} is the global batch and must be divisible by the "
                             f"number of data-reading processes data_world={data_world}")
        # batch_size is global (the original): each of data_world readers yields its share.
        self.local_batch_size = c.batch_size // self.data_world
        self._next_index = 0  # index of the next line/row to read
        self._last_index = -1  # index of the last line/row consumed (metrics, original 'index')
        self._file_loc = 0  # byte offset of the next line (JSON files)
        self._total_tokens = 0
        self._epoch = 0
        self._counters: dict[str, int] = collections.Counter()
        self._buffer: dict | None = None
        self._snapshot: dict | None = None
        self._n_reported = 0

    # -- state ------------------------------------------------------------------------------
    def _layout_key(self) -> dict:
        return dict(layout=self._layout_name, seq_length=self.config.seq_length,
                    local_batch_size=self.local_batch_size, data_rank=self.data_rank,
                    data_world=self.data_world)

    def _position_state(self) -> dict:
        return dict(index=self._last_index, next_index=self._next_index, file_loc=self._file_loc,
                    total_tokens=self._total_tokens, epoch=self._epoch, counters=dict(self._counters))

    def _make_state(self) -> dict:
        return dict(self._position_state(), version=STATE_FORMAT_VERSION, config=self.config.to_dict(),
                    buffer=self._buffer, layout=self._layout_key())

    def get_state_dict(self) -> dict:
        """Small picklable state; loading it makes iteration continue at exactly the next batch.

        Keys: file_loc (byte offset of the next line), index (last line read), total_tokens
        (as the original's dataset.pkl), next_index (index of the line at file_loc), buffer
        (tokens read but not yet yielded), epoch, counters, config, layout, version.
        """
        return copy.copy(self._snapshot) if self._snapshot is not None else self._make_state()

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``get_state_dict`` (or an original LWM ``dataset.pkl``).

        The saved config is compared, not applied: fields that differ are logged and the
        current config wins. A partial buffer saved under another layout (seq_length, batch,
        mode, data rank) is dropped with a warning; reading then resumes at the next line.
        """
        if not isinstance(state, dict):
            raise ValueError(f"dataset state must be a dict, got {type(state).__name__}")
        saved = state.get("config")
        if saved is not None:
            saved = saved.to_dict() if hasattr(saved, "to_dict") else dict(saved)
            now = self.config.to_dict()
            diff = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
            if diff:
                logger.warning("dataset state was saved with other config values (saved, now): %s; "
                               "using the current ones", diff)
        self._total_tokens = int(state.get("total_tokens", self._total_tokens))
        if "version" not in state:
            # An original LWM state: 'index' is the last line read, 'file_loc' the offset after it;
            # its partial buffer was not saved, so reading resumes at the next line.
            self._last_index = int(state.get("index", self._last_index))
            self._file_loc = int(state.get("file_loc", self._file_loc))
            self._next_index = 0 if self._file_loc == 0 else self._last_index + 1
            self._buffer = None
        else:
            self._last_index = int(state["index"])
            self._next_index = int(state["next_index"])
            self._file_loc = int(state.get("file_loc") or 0)
            self._epoch = int(state.get("epoch", 0))
            self._counters = collections.Counter(state.get("counters", {}))
            self._buffer = state.get("buffer")
            if self._buffer is not None and state.get("layout") != self._layout_key():
                logger.warning("dataset state holds a partial batch made for %s but this loader uses %s; "
                               "dropping it and resuming at the next unread example",
                               state.get("layout"), self._layout_key())
                self._buffer = None
        self._snapshot = None

    # -- iteration ----------------------------------------------------------------------------
    def _problem_where(self, index: int) -> str:
        raise NotImplementedError

    def _items(self) -> Iterator[tuple[int | None, int | None, Any]]:
        raise NotImplementedError

    def _metrics(self, batch_stats: dict, start_time: float, start_tokens: int, step_times) -> dict:
        now = time.time()
        metrics = {
            "dataset_file_loc": self._file_loc,
            "dataset_example_index": self._last_index,
            "dataset_total_tokens": self._total_tokens,
            "dataset_accumulated_tps": (self._total_tokens - start_tokens) / max(now - start_time, 1e-9),
            "dataset_average_tps": self.config.batch_size * self.config.seq_length / max(float(np.mean(step_times)), 1e-9),
            "dataset_epoch": self._epoch,
        }
        for kind in PROBLEM_KINDS:
            metrics[f"dataset_{kind}_lines"] = self._counters.get(f"dataset_{kind}_lines", 0)
        for key in ("dataset_blank_lines", "dataset_partial_frame_lines", "dataset_truncated_examples",
                    "dataset_split_examples", "dataset_empty_examples", "dataset_no_loss_examples"):
            metrics[key] = self._counters.get(key, 0)
        metrics.update(batch_stats)
        return metrics

    def _report(self, message: str) -> None:
        """Log a problem; past MAX_LOGGED_PROBLEMS only every 10,000th (all are counted in metrics)."""
        self._n_reported += 1
        if self._n_reported <= MAX_LOGGED_PROBLEMS or self._n_reported % 10_000 == 0:
            logger.warning(message)
        if self._n_reported == MAX_LOGGED_PROBLEMS:
            logger.warning("%s: %d problems so far; from now on only every 10,000th is logged, all are "
                           "counted in the dataset_*_lines metrics", self._source_label, MAX_LOGGED_PROBLEMS)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
        c = self.config
        rows = _LAYOUTS[self._layout_name](c.seq_length, self.local_batch_size, self._buffer)
        pad_id = self._tokenizer.bos_token_id
        global_chunk = c.batch_size * c.seq_length
        start_time = last_time = time.time()
        start_tokens = self._total_tokens
        step_times: collections.deque[float] = collections.deque(maxlen=max(1, c.throughput_average_window_size))
        usable_in_pass, first_problem = 0, None
        items = self._items()
        try:
            while True:
                # A restored partial batch may already be complete: yield it before reading on.
                while rows.ready():
                    batch, stats = rows.pop(pad_id)
                    if c.always_start_with_bos:
                        batch["input_tokens"][:, 0] = self._tokenizer.bos_token_id
                    self._total_tokens += global_chunk
                    now = time.time()
                    step_times.append(now - last_time)
                    last_time = now
                    self._buffer = rows.state()
                    self._snapshot = self._make_state()
                    yield batch, self._metrics(stats, start_time, start_tokens, step_times)
                index, loc, result = next(items)
                if isinstance(result, _Wrap):
                    if result.from_start and usable_in_pass == 0:
                        what = "is empty" if result.n_read == 0 else (
                            f"has no usable example for data rank {self.data_rank} of {self.data_world} in a "
                            f"full pass over {result.n_read} lines; counts: "
                            f"{ {k: v for k, v in self._counters.items() if v} }; first problem: {first_problem}")
                        raise DataError(f"{self._source_label} {what}", "empty")
                    usable_in_pass = 0
                    self._epoch += 1
                    self._next_index, self._file_loc = 0, 0
                    continue
                self._last_index, self._next_index = index, index + 1
                if loc is not None:
                    self._file_loc = loc
                if isinstance(result, _Blank):
                    self._counters["dataset_blank_lines"] += 1
                    continue
                if isinstance(result, _Problem):
                    self._counters[f"dataset_{result.kind}_lines"] += 1
                    message = f"{self._problem_where(index)}: {result.message}; skipped"
                    first_problem = first_problem or message
                    self._report(message)
                    continue
                usable_in_pass += 1
                if result.dropped_vision_codes:
                    self._counters["dataset_partial_frame_lines"] += 1
                    self._report(f"{self._problem_where(index)}: {result.dropped_vision_codes} vision codes are not "
                                 "a multiple of n_tokens_per_frame; dropped the trailing partial frame")
                self._counters.update(rows.add(result))
        finally:
            items.close()  # stops the tokenizer workers, if any

    # -- original properties --------------------------------------------------------------------
    @property
    def seq_length(self) -> int:
        return self.config.seq_length

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def text_processor(self):
        return self._processor

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size
