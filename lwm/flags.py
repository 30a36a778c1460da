"""absl flags with nested ConfigDict groups, as LWM's entry points take them.

    FLAGS, DEFAULTS = define_flags_with_default(
        seed=42, mesh_dim="1,-1,1,1", llama=LLaMAConfig.get_default_config(),
        optimizer=OptimizerFactory.get_default_config(), tokenizer=DEFAULT_TOKENIZER)

Every leaf of a ConfigDict default becomes one flag named by its dotted path
(`--optimizer.adamw_optimizer.lr=8e-5`), typed by its default; `FLAGS.optimizer` is then a
ConfigDict of the parsed values. `tokenizer` is a string flag that also accepts the
original's `--tokenizer.vocab_file=PATH` form. Unknown flags are an error (absl's).
"""
from __future__ import annotations

import ast
import logging
import sys
from typing import Any

import absl.flags
from ml_collections import ConfigDict

_FLAGS = absl.flags.FLAGS
# absl files a flag under the module that calls DEFINE_*, and `--help` lists only the main
# module's: attribute our definitions to the entry point that calls define_flags_with_default.
absl.flags.disclaim_key_flags()


class _NoLibtpuNotice(logging.Filter):
    """Drops jax's INFO line that libtpu is not installed, which every entry point printed on
    CPU and GPU machines; a TPU that is present but fails still gets jax's own warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and "Failed to open libtpu.so" in record.getMessage())


logging.getLogger("jax._src.xla_bridge").addFilter(_NoLibtpuNotice())


def _literal_or_string(text: str):
    """Numbers, bools and None as such; everything else (e.g. '1,-1,1,1') stays a string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if value is None or isinstance(value, (bool, int, float)) else text


def _define_leaf(name: str, default: Any, help_text: str) -> None:
    if name in _FLAGS:
        return
    if isinstance(default, bool):
        absl.flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
        absl.flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
        absl.flags.DEFINE_float(name, default, help_text)
    elif isinstance(default, str):
        absl.flags.DEFINE_string(name, default, help_text)
    else:  # None default: a number, bool or None literal, else the string
        absl.flags.DEFINE(absl.flags.ArgumentParser(), name, default, f"{help_text} (default None)")
        _FLAGS[name].parser.parse = _literal_or_string  # type: ignore[method-assign]


def _leaves(prefix: str, config: ConfigDict):
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, ConfigDict):
            yield from _leaves(name, value)
        else:
            yield name, value


def _value(name: str, default):
    """A flag's parsed value, or this entry point's own default when the command line did not
    set it (several entry points imported into one process may share a flag name, e.g. seed,
    with different defaults; absl keeps only the first definition)."""
    flag = _FLAGS[name]
    return flag.value if flag.present else default


class ParsedFlags:
    """Attribute access to parsed flags; ConfigDict groups come back assembled."""

    def __init__(self, defaults: dict):
        self._defaults = defaults

    def __getattr__(self, name: str):
        defaults = self.__dict__["_defaults"]
        if name not in defaults:
            raise AttributeError(f"no flag named {name!r}")
        default = defaults[name]
        if name == "tokenizer":
            return tokenizer_spec(str(default))
        if isinstance(default, ConfigDict):
            return self._group(name, default)
        return _value(name, default)

    def _group(self, prefix: str, default: ConfigDict) -> ConfigDict:
        out = ConfigDict()
        for key, value in default.items():
            name = f"{prefix}.{key}"
            out[key] = self._group(name, value) if isinstance(value, ConfigDict) else _value(name, value)
        return out

    def explicit(self, group: str) -> set[str]:
        """The keys of a flag group given on the command line (`--llama.theta=...` -> 'theta')."""
        default = self.__dict__["_defaults"][group]
        return {key for key, value in default.items()
                if not isinstance(value, ConfigDict) and _FLAGS[f"{group}.{key}"].present}

    def flag_dict(self) -> dict:
        """Every flag's value (groups as plain nested dicts), for metadata and logs."""
        return {k: (getattr(self, k).to_dict() if isinstance(getattr(self, k), ConfigDict) else getattr(self, k))
                for k in self._defaults}


def define_flags_with_default(**defaults) -> tuple[ParsedFlags, dict]:
    for name, default in defaults.items():
        if name == "tokenizer":
            _define_leaf("tokenizer", str(default), "tokenizer: a tokenizer.model file, a folder holding one, "
                         "a Hugging Face hub name, or 'builtin'")
            _define_leaf("tokenizer.vocab_file", "", "the original's form of --tokenizer (takes precedence)")
        elif isinstance(default, ConfigDict):
            for leaf, value in _leaves(name, default):
                _define_leaf(leaf, value, leaf)  # absl's help adds the default
        else:
            _define_leaf(name, default, name)
    return ParsedFlags(defaults), defaults


def tokenizer_spec(default: str | None = None) -> str:
    """--tokenizer.vocab_file if given, else --tokenizer (else `default`, else absl's default)."""
    vocab_file = _FLAGS["tokenizer.vocab_file"].value if "tokenizer.vocab_file" in _FLAGS else ""
    if vocab_file:
        return vocab_file
    flag = _FLAGS["tokenizer"]
    return flag.value if flag.present or default is None else default


def parse_flags_for_test(argv: list[str]) -> None:
    """Parse argv (without the program name) into the defined flags, as absl.app.run would."""
    _FLAGS.unparse_flags()
    _FLAGS([sys.argv[0]] + list(argv))
