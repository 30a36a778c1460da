"""Model configurations: the LLaMA text model and the video-language model.

A config is a frozen dataclass, validated when it is built, so a bad combination fails
at start-up with the numbers in the message rather than deep inside a jitted function:

    >>> cfg = load_config("debug").replace(theta=1e7, max_sequence_length=131072)
    >>> cfg = cfg.replace(**parse_config_updates("dict(scan_query_chunk_size=512)"))

Sources (`load_config`): a standard size name (`7b`, `debug`, ...), `json::PATH` (our JSON,
or a `transformers` config dump written by the original code: unknown keys are ignored)
and `pickle::PATH` (a `metadata.pkl` holding a `llama_config` entry); PATH may be a bucket URL
(`json::gs://bucket/run/config.json`, read through `lwm.storage`). Updates come from
`--update_llama_config="dict(theta=10000,scan_attention=True)"` strings, parsed as
literals only (never `eval`).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import pickle
import re
from typing import Any, Collection, Mapping

from ml_collections import ConfigDict

from lwm import storage

ATTENTION_IMPLS = ("auto", "dense", "blockwise", "pallas")
SEQUENCE_LAYOUTS = ("contiguous", "zigzag", "striped")
SP_ATTENTION = ("auto", "ring", "all_gather")
# jax.checkpoint_policies names usable in remat_* fields ('' = no rematerialisation).
REMAT_POLICIES = (
    "", "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
    "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims",
    "save_attention",  # ours: keep q, k, v and the attention's results, recompute the rest
)
SAMPLE_MODES = ("all", "text", "vision")

# Standard sizes: (hidden, intermediate, layers, heads, max_sequence_length).
_SIZES = {
    "debug": (256, 256, 2, 2, 2048),
    "200m": (1024, 2048, 14, 8, 2048),
    "1b": (2048, 5504, 22, 16, 2048),
    "3b": (3200, 8640, 26, 32, 2048),
    "7b": (4096, 11008, 32, 32, 4096),
    "13b": (5120, 13824, 40, 40, 2048),
    "30b": (6656, 17920, 60, 52, 2048),
    "65b": (8192, 22016, 80, 64, 2048),
}
STANDARD_CONFIGS = {
    name: dict(
        vocab_size=32000, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
        num_attention_heads=a, max_sequence_length=s, initializer_range=0.02,
        rms_norm_eps=1e-5 if name == "65b" else 1e-6, use_cache=True, tie_word_embeddings=False,
    )
    for name, (h, i, n, a, s) in _SIZES.items()
}

# Fields that describe how to run (not what the weights are): when a standard size or a
# file is loaded, these come from the command line's --llama.* flags, as in the original.
RUNTIME_FIELDS = (
    "remat_block", "remat_attention", "remat_mlp", "scan_attention", "scan_mlp",
    "scan_query_chunk_size", "scan_key_chunk_size", "scan_mlp_chunk_size", "scan_layers",
    "param_scan_axis", "attention_impl", "sequence_layout", "scan_loss_chunk_size", "sp_attention",
)

# Keys of a transformers LlamaConfig that map onto ours (used only when ours is absent).
_HF_ALIASES = {"rope_theta": "theta", "max_position_embeddings": "max_sequence_length"}


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
    """LLaMA text model config: the original's fields and defaults, plus GQA and kernel choice."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None = num_attention_heads
    max_sequence_length: int = 4096  # longest input accepted (and RoPE range)
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # std of the normal init of every kernel and embedding
    use_cache: bool = True
    bos_token_id: int = 0  # replaced by the tokenizer's at start-up
    eos_token_id: int = 1
    resid_pdrop: float = 0.0  # dropout after attention and MLP outputs
    embd_pdrop: float = 0.0  # dropout on token embeddings
    attn_pdrop: float = 0.0  # accepted for compatibility; attention weights are never materialised
    tie_word_embeddings: bool = False  # lm_head reuses transformer/wte/embedding
    remat_block: str = ""  # jax.checkpoint policy for a whole decoder layer ('' = none)
    remat_attention: str = ""  # policy for the attention kernel's internals
    remat_mlp: str = ""  # policy for each MLP chunk when scan_mlp
    scan_attention: bool = True  # blockwise/ring attention (False with attention_impl=auto: dense)
    scan_mlp: bool = True  # feed-forward over sequence chunks of scan_mlp_chunk_size
    scan_query_chunk_size: int = 1024
    scan_key_chunk_size: int = 1024
    scan_mlp_chunk_size: int = 1024
    scan_loss_chunk_size: int = 1024  # sequence chunk of the blockwise LM head + loss
    scan_layers: bool = True  # layers under nn.scan (params stacked on param_scan_axis)
    param_scan_axis: int = 0
    mesh_dim: str | None = None  # recorded for reference; the mesh is built by the entry point
    theta: float = 10000.0  # RoPE base
    attention_impl: str = "auto"  # auto | dense | blockwise | pallas
    sequence_layout: str = "contiguous"  # order of tokens along sp: contiguous | zigzag | striped
    sp_attention: str = "auto"  # k/v across sp shards: ring | all_gather | auto (all_gather when small)
    use_flash_attention: bool = False  # original flag; with attention_impl=auto it asks for a kernel

    def __post_init__(self):
        # A kv-head count left unset follows num_attention_heads, also through later replace().
        object.__setattr__(self, "_kv_heads_follow", self.num_key_value_heads is None)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self._validate()

    # ---- validation -------------------------------------------------------------------
    def _validate(self):
        def positive(*names):
            for n in names:
                if getattr(self, n) <= 0:
                    raise ValueError(f"{n} must be positive, got {getattr(self, n)}")

        positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_sequence_length",
                 "scan_query_chunk_size", "scan_key_chunk_size", "scan_mlp_chunk_size",
                 "scan_loss_chunk_size", "theta", "rms_norm_eps")
        hidden, heads, kv_heads = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if hidden % heads:
            raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        if (hidden // heads) % 2:
            raise ValueError(f"head_dim={hidden // heads} must be even for rotary embeddings")
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.param_scan_axis not in (0, 1):
            raise ValueError(f"param_scan_axis must be 0 or 1, got {self.param_scan_axis}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.sequence_layout not in SEQUENCE_LAYOUTS:
            raise ValueError(f"sequence_layout={self.sequence_layout!r}; expected one of {SEQUENCE_LAYOUTS}")
        if self.sp_attention not in SP_ATTENTION:
            raise ValueError(f"sp_attention={self.sp_attention!r}; expected one of {SP_ATTENTION}")
        for name in ("remat_block", "remat_attention", "remat_mlp"):
            if getattr(self, name) not in REMAT_POLICIES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {REMAT_POLICIES}")

    def check_mesh(self, mesh_shape: Mapping[str, int]) -> None:
        """Check divisibility against a mesh ({'dp': ., 'fsdp': ., 'tp': ., 'sp': .})."""
        tp = mesh_shape.get("tp", 1)
        for name in ("num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) % tp:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by the mesh's tp={tp}")

    # ---- derived ------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def resolved_attention_impl(self, backend: str | None = None) -> str:
        """The kernel `auto` means on this backend (pallas on gpu/tpu, blockwise on cpu)."""
        if self.attention_impl != "auto":
            return self.attention_impl
        if not (self.scan_attention or self.use_flash_attention):
            return "dense"
        if backend is None:
            import jax

            backend = jax.default_backend()
        return "pallas" if backend in ("gpu", "tpu", "cuda", "rocm") else "blockwise"

    def num_params(self) -> int:
        h, i, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + h + self._extra_params()

    def _extra_params(self) -> int:
        return 0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = False) -> "LLaMAConfig":
        """Build from a mapping; unknown keys raise with `strict`, else are ignored."""
        names = set(cls.field_names())
        d = dict(d)
        for hf_key, key in _HF_ALIASES.items():
            if hf_key in d and key not in d:
                d[key] = d[hf_key]
        unknown = sorted(k for k in d if k not in names)
        if strict and unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items() if k in names})

    def replace(self, **updates) -> "LLaMAConfig":
        """A copy with `updates` applied (unknown fields are an error)."""
        unknown = sorted(k for k in updates if k not in self.field_names())
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} field(s) {unknown}; valid fields: "
                             f"{sorted(self.field_names())}")
        updates = {k: _coerce(type(self), k, v) for k, v in updates.items()}
        if self._kv_heads_follow and "num_key_value_heads" not in updates:
            updates["num_key_value_heads"] = None
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_json(self, path: str) -> None:
        """Written whole, atomically (a local file or a bucket object)."""
        storage.write_text(path, self.to_json_string() + "\n")

    @classmethod
    def get_default_config(cls, updates: Mapping[str, Any] | None = None) -> ConfigDict:
        """Every field as a ConfigDict (the `--llama.*` flags)."""
        config = ConfigDict(cls().to_dict() | {"num_key_value_heads": None})
        if updates:
            config.update(updates)
        return config

    @classmethod
    def load_config(cls, spec: str) -> "LLaMAConfig":
        return load_config(spec, cls)


@dataclasses.dataclass(frozen=True)
class VideoLLaMAConfig(LLaMAConfig):
    """The video-language model: the text model plus vision embeddings and a vision head."""

    vision_vocab_size: int = 8448  # 8192 VQGAN codes + end-of-frame/end-of-vision + spare
    tie_vision_embeddings: bool = False  # vision_head reuses transformer/vte/embedding
    sample_mode: str = "all"  # which head(s) the forward returns: all | text | vision

    def _validate(self):
        super()._validate()
        if self.vision_vocab_size <= 8193:
            raise ValueError(f"vision_vocab_size={self.vision_vocab_size} must exceed 8193 "
                             "(8192 codes plus the end-of-frame 8192 and end-of-vision 8193 markers)")
        if self.sample_mode not in SAMPLE_MODES:
            raise ValueError(f"sample_mode={self.sample_mode!r}; expected one of {SAMPLE_MODES}")

    def _extra_params(self) -> int:
        return self.vision_vocab_size * self.hidden_size * (1 if self.tie_vision_embeddings else 2)


def _coerce(cls, name: str, value: Any) -> Any:
    """Match JSON/flag values to the field's type (ints given as 1e7 floats, tuples as lists)."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, (bool, int)):
            raise ValueError(f"{name} must be a bool, got {value!r}")
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def parse_config_updates(text: str) -> dict:
    """Parse `dict(a=1, b='x')` or `{'a': 1}` holding literals only; anything else is rejected.

    >>> parse_config_updates("dict(theta=1e7, scan_layers=True, remat_block='nothing_saveable')")
    {'theta': 10000000.0, 'scan_layers': True, 'remat_block': 'nothing_saveable'}
    """
    text = (text or "").strip()
    if not text:
        return {}
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse config updates {text!r}: {e.msg}") from None
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict") or node.args:
            raise ValueError(f"config updates must be dict(key=value, ...) with keyword arguments only, got {text!r}")
        items = []
        for kw in node.keywords:
            if kw.arg is None:
                raise ValueError(f"config updates: '**' expansion is not allowed in {text!r}")
            items.append((kw.arg, kw.value))
    elif isinstance(node, ast.Dict):
        items = []
        for k, v in zip(node.keys, node.values):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise ValueError(f"config updates: keys must be strings, got {ast.unparse(k) if k else '**'}")
            items.append((k.value, v))
    else:
        raise ValueError(f"config updates must look like dict(key=value, ...), got {text!r}")
    out = {}
    for key, value_node in items:
        if key in out:
            raise ValueError(f"config updates: {key!r} is given twice")
        try:
            out[key] = ast.literal_eval(value_node)
        except ValueError:
            raise ValueError(f"config updates: the value of {key!r} is not a literal (numbers, strings, "
                             f"bools, None, tuples): {ast.unparse(value_node)}") from None
    return out


def load_config(spec: str, cls: type[LLaMAConfig] = LLaMAConfig) -> LLaMAConfig:
    """A config from a standard size name, `json::PATH` or `pickle::PATH`."""
    return cls.from_dict(read_config_fields(spec))


def read_config_fields(spec: str) -> dict:
    """The fields a standard size name, `json::PATH` or `pickle::PATH` writes down, as a dict
    (before defaults fill the rest: which fields a file sets decides where a value comes from)."""
    if spec in STANDARD_CONFIGS:
        return dict(STANDARD_CONFIGS[spec])
    if "::" not in spec:
        raise ValueError(f"unknown config {spec!r}: expected one of {sorted(STANDARD_CONFIGS)}, "
                         "'json::PATH' or 'pickle::PATH'")
    kind, path = spec.split("::", 1)
    if kind == "json":
        try:
            raw = json.loads(storage.read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return raw
    if kind == "pickle":
        raw = pickle.loads(storage.read_bytes(path))
        if isinstance(raw, dict) and "llama_config" in raw:
            raw = raw["llama_config"]
        if hasattr(raw, "to_dict"):
            raw = raw.to_dict()
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: expected a dict with a 'llama_config' entry, got {type(raw).__name__}")
        return dict(raw)
    raise ValueError(f"unknown config source {kind!r} in {spec!r}: expected 'json' or 'pickle'")


def build_config(*args, **kwargs) -> LLaMAConfig:
    """The model config every entry point uses: `build_config_with_sources` (same arguments)
    without the sources."""
    return build_config_with_sources(*args, **kwargs)[0]


def build_config_with_sources(
    load_llama_config: str,
    llama_flags: Mapping[str, Any],
    update_llama_config: str = "",
    tokenizer=None,
    mesh_dim: str | None = None,
    cls: type[LLaMAConfig] = LLaMAConfig,
    grow_vocab: bool = True,
    explicit: Collection[str] | None = None,
) -> tuple[LLaMAConfig, dict[str, str]]:
    """The model config, assembled in the original's order, and where each run-time field came from.

    1. `load_llama_config` (size name or file). Its run-time fields (scan_*, remat_*, chunk
       sizes, kernel choice) come from `--llama.*` when that flag is given on the command line
       (`explicit`: the `--llama.*` names present; None = all of `llama_flags`), else from the
       file when it writes them down, else from the flag defaults. (The original took them from
       `--llama.*` always, so a file's chunk sizes were silently replaced by the 1024 defaults;
       its scripts pass the flags explicitly and behave as before.) Without it, all of `--llama.*`.
    2. `--update_llama_config` literals.  3. bos/eos from the tokenizer, and (with `grow_vocab`,
    as the original's training did) vocab_size grown to the tokenizer's size if smaller.
    4. mesh_dim recorded. Inference passes grow_vocab=False: a checkpoint's shapes are fixed.

    With `load_llama_config`, a model field set through `--llama.*` to anything but its flag
    default is an error: the original ignored it silently (a context-extension stage that set
    `--llama.theta` trained at the loaded theta).

    Sources map each RUNTIME_FIELDS name to `--update_llama_config`, `--llama.X`, the config
    spec (`json::configs/tiny_text.json`) or `default` (`describe_runtime_fields` prints them).
    """
    flags = {k: v for k, v in dict(llama_flags).items() if k in cls.field_names()}
    given = set(flags) if explicit is None else set(explicit) & set(flags)
    updates = _parse_named_updates(update_llama_config)
    sources = {}
    if load_llama_config:
        defaults = cls.get_default_config()
        for k, v in flags.items():
            if k not in RUNTIME_FIELDS and k in given and v != defaults[k]:
                raise ValueError(f"--llama.{k}={v!r} is ignored when --load_llama_config is given (only run-time "
                                 f"fields are taken from --llama.*); use --update_llama_config=\"dict({k}={v!r})\" "
                                 "instead")
        written = read_config_fields(load_llama_config)
        try:
            config = cls.from_dict(written)
        except ValueError as e:
            raise ValueError(f"--load_llama_config={load_llama_config}: {e}") from None
        runtime = {}
        for k in RUNTIME_FIELDS:
            if k in given or k not in written:
                runtime[k] = flags.get(k, getattr(config, k))
                sources[k] = f"--llama.{k}" if k in given else "default"
            else:
                sources[k] = load_llama_config
        config = _with_flag_names(config, runtime, "--llama")
    else:
        config = _with_flag_names(cls(), flags, "--llama")
        sources = {k: f"--llama.{k}" if k in given else "default" for k in RUNTIME_FIELDS}
    config = _with_flag_names(config, updates, "--update_llama_config")
    sources.update({k: "--update_llama_config" for k in updates if k in RUNTIME_FIELDS})
    if tokenizer is not None:
        config = config.replace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if grow_vocab and config.vocab_size < tokenizer.vocab_size:
            config = config.replace(vocab_size=tokenizer.vocab_size)
    if mesh_dim is not None:
        config = config.replace(mesh_dim=mesh_dim)
    return config, sources


def _parse_named_updates(text: str) -> dict:
    """parse_config_updates, its errors naming the flag."""
    try:
        return parse_config_updates(text)
    except ValueError as e:
        raise ValueError(f"--update_llama_config: {e}") from None


def _with_flag_names(config: LLaMAConfig, updates: Mapping[str, Any], flag: str) -> LLaMAConfig:
    """config.replace(**updates), a bad value's error naming the flag it came from."""
    try:
        return config.replace(**updates)
    except ValueError as e:
        if flag == "--update_llama_config":
            raise ValueError(f"{flag}: {e}") from None
        message = str(e)
        # the field the message is about: the first named in it (the longest name where two start there)
        named = [(m.start(), -len(k), k) for k in updates if (m := re.search(rf"\b{k}\b", message))]
        raise ValueError(f"{flag}.{min(named)[2] if named else '*'}: {message}") from None


def describe_runtime_fields(config: LLaMAConfig, sources: Mapping[str, str]) -> str:
    """`scan_query_chunk_size=128 (json::configs/tiny_text.json), remat_block='' (default), ...`"""
    return ", ".join(f"{k}={getattr(config, k)!r} ({sources.get(k, 'default')})" for k in RUNTIME_FIELDS)
