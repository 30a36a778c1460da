"""Training data: text / vision-text processors, JSON and Hugging Face datasets, packing, loader state.

A dataset yields ``(batch, metrics)`` forever (files wrap at EOF). ``batch`` holds numpy
arrays shaped [local_batch, seq_length]: ``input_tokens``, ``target_tokens`` (inputs
shifted by one), ``loss_masks`` (float32), ``segment_ids``, ``positions`` (int32),
``input_vision_masks`` and ``target_vision_masks`` (bool). Three ways to lay examples
into rows:

* ``stream`` (the original default): examples concatenated into one token stream cut
  into rows; attention may cross examples (segment ids all 1), 0/1 loss masks.
* ``pad``: one example per row, truncated to the row, right-padded (segment 0).
* ``packed`` (masked sequence packing): whole examples placed into rows by best fit;
  segment ids 1.. per example, positions restart at 0, and loss weights 1/(loss tokens of
  the example) so the trainer's sum(w * ce) / sum(w) is the mean over examples of each
  example's mean loss. See ``Packer`` for a worked example.

The path of one example, one module per step (their public names are re-exported here):

    processors.py           JSON example -> tokens, loss masks, vision masks (field specs)
    layouts.py              processed examples -> rows of a batch (stream, pad, packed)
    dataset.py              the loop every dataset shares: items -> layout -> (batch, metrics), resume state
    json_dataset.py         JSONL sources (json, json_vision), tokenizer worker processes
    huggingface_dataset.py  ``datasets.load_dataset`` sources (huggingface)
    factory.py              ``DatasetFactory``: the config tree and the dataset its ``type`` names
    common.py               ``DataError``, the problem kinds, the config-update helper

This package never imports jax: it runs on the host and in tokenizer worker processes.
The trainer turns the host-local numpy batch into a global array. Run it alone with::

    python -c "from lwm.data import DatasetFactory; from lwm.tokenizer import load_tokenizer; \\
        c = DatasetFactory.get_default_config({'type': 'json'}); c.json_dataset.path = 'data.jsonl'; \\
        c.text_processor.fields = 'text'; b, m = next(iter(DatasetFactory.load_dataset(c, load_tokenizer('builtin')))); print(m)"
"""
# The constants below are copies: to change one, patch the module that reads it
# (e.g. lwm.data.dataset.MAX_LOGGED_PROBLEMS, lwm.data.json_dataset.WORKER_START_METHOD).
from lwm.data.common import PROBLEM_KINDS, DataError
from lwm.data.dataset import MAX_LOGGED_PROBLEMS, STATE_FORMAT_VERSION
from lwm.data.factory import DatasetFactory
from lwm.data.huggingface_dataset import HuggingfaceDataset
from lwm.data.json_dataset import WORKER_START_METHOD, JsonDataset, JsonVisionDataset
from lwm.data.layouts import BATCH_KEYS, Packer, PadRows, Piece, StreamRows, build_rows, example_to_pieces
from lwm.data.processors import FieldSpec, ProcessedExample, TextProcessor, VisionTextProcessor, parse_field_spec

__all__ = [
    "BATCH_KEYS", "MAX_LOGGED_PROBLEMS", "PROBLEM_KINDS", "STATE_FORMAT_VERSION", "WORKER_START_METHOD",
    "DataError", "DatasetFactory", "FieldSpec", "HuggingfaceDataset", "JsonDataset", "JsonVisionDataset",
    "Packer", "PadRows", "Piece", "ProcessedExample", "StreamRows", "TextProcessor", "VisionTextProcessor",
    "build_rows", "example_to_pieces", "parse_field_spec",
]
