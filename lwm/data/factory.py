"""``DatasetFactory``: the ``--train_dataset`` config tree and the dataset that its ``type`` names."""
from __future__ import annotations

from ml_collections import ConfigDict

from lwm.data.common import _update_config
from lwm.data.huggingface_dataset import HuggingfaceDataset
from lwm.data.json_dataset import JsonDataset, JsonVisionDataset
from lwm.data.processors import TextProcessor, VisionTextProcessor


class DatasetFactory:
    """Builds the dataset that ``config.type`` names: ``huggingface``, ``json`` or ``json_vision``."""

    def __init__(self):
        raise ValueError("DatasetFactory is a static class; call DatasetFactory.load_dataset(config, tokenizer)")

    @staticmethod
    def get_default_config(updates=None) -> ConfigDict:
        config = ConfigDict()
        config.type = "huggingface"  # huggingface | json | json_vision
        config.text_processor = TextProcessor.get_default_config()
        config.huggingface_dataset = HuggingfaceDataset.get_default_config()
        config.json_dataset = JsonDataset.get_default_config()
        config.vision_text_processor = VisionTextProcessor.get_default_config()
        config.json_vision_dataset = JsonVisionDataset.get_default_config()
        return _update_config(config, updates)

    @classmethod
    def load_dataset(cls, config, tokenizer, data_rank: int = 0, data_world: int = 1):
        """The dataset for this process: ``data_rank`` of ``data_world`` processes reading distinct data."""
        config = cls.get_default_config(config)
        if config.type == "huggingface":
            return HuggingfaceDataset(config.huggingface_dataset, tokenizer,
                                      TextProcessor(config.text_processor, tokenizer), data_rank, data_world)
        if config.type == "json":
            return JsonDataset(config.json_dataset, tokenizer,
                               TextProcessor(config.text_processor, tokenizer), data_rank, data_world)
        if config.type == "json_vision":
            return JsonVisionDataset(config.json_vision_dataset, tokenizer,
                                     VisionTextProcessor(config.vision_text_processor, tokenizer),
                                     data_rank, data_world)
        raise ValueError(f"dataset type must be huggingface, json or json_vision, got {config.type!r}")
