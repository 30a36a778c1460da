"""Training data (being split into modules; see lwm/data/processors.py for now)."""
from lwm.data.processors import (BATCH_KEYS, MAX_LOGGED_PROBLEMS, PROBLEM_KINDS, STATE_FORMAT_VERSION,
                                 WORKER_START_METHOD, DataError, DatasetFactory, FieldSpec, HuggingfaceDataset,
                                 JsonDataset, JsonVisionDataset, Packer, PadRows, Piece, ProcessedExample,
                                 StreamRows, TextProcessor, VisionTextProcessor, build_rows, example_to_pieces,
                                 parse_field_spec)
