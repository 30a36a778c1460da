"""Conversion between LWM streaming params and Hugging Face `LlamaForCausalLM` folders.

The two differ in three ways:
* kernels are [in, out] here and torch Linear weights [out, in] there (transpose);
* RoPE: LWM rotates interleaved pairs (2i, 2i+1) of each head, Hugging Face rotates
  split halves (i, i + head_dim/2), so the q and k output rows are permuted per head:
  hf_rows = lwm_rows[perm] with perm = [0, 2, 4, ..., 1, 3, 5, ...];
* layer stacking: scanned LWM checkpoints hold [layers, ...] (or [.., layers, ..] with
  param_scan_axis=1) tensors; Hugging Face names every layer.

Both directions stream one tensor at a time: a 7B model converts on a host that holds
one stacked tensor and one safetensors shard in memory.

The LWM side may be in a bucket (`gs://bucket/run/streaming_params`, through `lwm.storage`);
the Hugging Face folder is local in both directions (transformers and safetensors read and
write local folders): copy it up or down with `gcloud storage cp -r`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterator

import numpy as np

from lwm import storage
from lwm.checkpoint import AtomicWriter, cast_floats, iter_streaming
from lwm.config import LLaMAConfig

_LAYER_KEYS = {  # LWM path inside a decoder layer -> Hugging Face name inside model.layers.{i}
    ("attention", "wq", "kernel"): "self_attn.q_proj.weight",
    ("attention", "wk", "kernel"): "self_attn.k_proj.weight",
    ("attention", "wv", "kernel"): "self_attn.v_proj.weight",
    ("attention", "wo", "kernel"): "self_attn.o_proj.weight",
    ("feed_forward", "w1", "kernel"): "mlp.gate_proj.weight",
    ("feed_forward", "w2", "kernel"): "mlp.down_proj.weight",
    ("feed_forward", "w3", "kernel"): "mlp.up_proj.weight",
    ("attention_norm", "kernel"): "input_layernorm.weight",
    ("ffn_norm", "kernel"): "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    ("transformer", "wte", "embedding"): "model.embed_tokens.weight",
    ("transformer", "ln_f", "kernel"): "model.norm.weight",
    ("lm_head", "kernel"): "lm_head.weight",
}


def rope_rows_to_hf(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking interleaved-pair rows (LWM) to split-half rows (HF), per head."""
    per_head = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None]).reshape(-1)


def lwm_to_hf_tensor(key: tuple[str, ...], value: np.ndarray, config: LLaMAConfig) -> np.ndarray:
    """One layer's (or a top-level) LWM tensor as the Hugging Face tensor."""
    if key in (("transformer", "wte", "embedding"),) or key[-2:] == ("ln_f", "kernel") or value.ndim == 1:
        return value
    weight = value.T  # [out, in]
    if key[:2] == ("attention", "wq"):
        weight = weight[rope_rows_to_hf(config.num_attention_heads, config.head_dim)]
    elif key[:2] == ("attention", "wk"):
        weight = weight[rope_rows_to_hf(config.num_key_value_heads, config.head_dim)]
    return np.ascontiguousarray(weight)


def hf_to_lwm_tensor(key: tuple[str, ...], weight: np.ndarray, config: LLaMAConfig) -> np.ndarray:
    """The inverse of `lwm_to_hf_tensor`."""
    if key in (("transformer", "wte", "embedding"),) or key[-2:] == ("ln_f", "kernel") or weight.ndim == 1:
        return weight
    if key[:2] == ("attention", "wq"):
        weight = weight[np.argsort(rope_rows_to_hf(config.num_attention_heads, config.head_dim))]
    elif key[:2] == ("attention", "wk"):
        weight = weight[np.argsort(rope_rows_to_hf(config.num_key_value_heads, config.head_dim))]
    return np.ascontiguousarray(weight.T)


def check_local_folder(flag: str, path: str, output: bool) -> None:
    """A Hugging Face folder given as a bucket URL is one line saying what to do instead."""
    if storage.is_remote(path):
        how = (f"write it locally, then copy it up: gcloud storage cp -r DIR {path}" if output else
               f"copy it down first: gcloud storage cp -r {path} DIR")
        raise ValueError(f"{flag}={path}: the Hugging Face folder must be a local path (transformers and "
                         f"safetensors use local files); {how}")


# ---- LWM -> Hugging Face ---------------------------------------------------------------------


def iter_lwm_layers(path: str, config: LLaMAConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, tensor) for every tensor of an LWM params file, scanned or not (from its keys)."""
    for key, value in iter_streaming(path):
        key = tuple(key)
        if key == ("step",) or key[:1] == ("opt_state",):  # a train state: only its params convert
            continue
        if key[:2] == ("params", "params"):  # a train state's params
            key = key[2:]
        elif key[:1] == ("params",):  # a params tree saved with its outer 'params'
            key = key[1:]
        if key in _TOP_KEYS:
            if key == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue
            yield _TOP_KEYS[key], lwm_to_hf_tensor(key, value, config)
            continue
        if key[:2] != ("transformer", "h"):
            raise ValueError(f"{path}: unexpected parameter {'/'.join(key)} for a text LLaMA model")
        inner = key[3:]
        if inner not in _LAYER_KEYS:
            raise ValueError(f"{path}: unexpected parameter {'/'.join(key)}")
        if key[2] == "scan_decoder":
            axis = _scan_axis(value, inner, config)
            for i in range(value.shape[axis]):
                yield (f"model.layers.{i}.{_LAYER_KEYS[inner]}",
                       lwm_to_hf_tensor(inner, np.take(value, i, axis=axis), config))
        elif key[2].isdigit():
            yield f"model.layers.{int(key[2])}.{_LAYER_KEYS[inner]}", lwm_to_hf_tensor(inner, value, config)
        else:
            raise ValueError(f"{path}: unexpected parameter {'/'.join(key)}")


def _scan_axis(value: np.ndarray, inner: tuple[str, ...], config: LLaMAConfig) -> int:
    """Which axis of a scanned tensor holds the layers (param_scan_axis 0 or 1)."""
    n = config.num_hidden_layers
    if value.shape[0] == n and (value.ndim == 1 or value.shape[1] != n or config.param_scan_axis == 0):
        return 0
    if value.ndim > 1 and value.shape[1] == n:
        return 1
    raise ValueError(f"scanned tensor {'/'.join(inner)} of shape {value.shape} has no axis of "
                     f"num_hidden_layers={n}")


def hf_config_dict(config: LLaMAConfig, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_sequence_length,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": float(config.theta),
        "hidden_act": "silu",
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


HF_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}  # None: written through torch


def hf_dtype(name: str):
    """The numpy dtype of a safetensors dtype name (None for bfloat16); a bad name names the flag."""
    if name not in HF_DTYPES:
        raise ValueError(f"--dtype={name!r}: expected one of {', '.join(HF_DTYPES)}")
    return HF_DTYPES[name]


def convert_lwm_to_hf(checkpoint_path: str, config: LLaMAConfig, output_dir: str, tokenizer: str | None = None,
                      dtype: str = "float32", shard_bytes: int = 5 * 2**30) -> None:
    """Write a folder `transformers.LlamaForCausalLM.from_pretrained` loads."""
    from safetensors.numpy import save_file

    check_local_folder("output_dir", output_dir, output=True)
    np_dtype = hf_dtype(dtype)
    os.makedirs(output_dir, exist_ok=True)
    shard, shard_size, shards, weight_map = {}, 0, [], {}
    umask = os.umask(0)
    os.umask(umask)

    def flush():
        nonlocal shard, shard_size
        if not shard:
            return
        name = f"model-{len(shards) + 1:05d}.safetensors"
        tmp = os.path.join(output_dir, name + ".tmp")
        if np_dtype is None:
            _save_bf16(shard, tmp)
        else:
            save_file(shard, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600 files; give the usual umask'd mode
        os.replace(tmp, os.path.join(output_dir, name))
        shards.append(name)
        for k in shard:
            weight_map[k] = name
        shard, shard_size = {}, 0

    for name, tensor in iter_lwm_layers(checkpoint_path, config):
        tensor = np.asarray(tensor, np.float32)
        if np_dtype is not None:
            tensor = tensor.astype(np_dtype)
        shard[name] = np.ascontiguousarray(tensor)
        shard_size += tensor.nbytes // (2 if np_dtype is None else 1)
        if shard_size >= shard_bytes:
            flush()
    flush()
    total = len(shards)
    final = {}
    for i, old in enumerate(shards):
        new = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(output_dir, old), os.path.join(output_dir, new))
        final[old] = new
    if total > 1:
        index = {"metadata": {}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        with AtomicWriter(os.path.join(output_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with AtomicWriter(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config, dtype), f, indent=2)
    with AtomicWriter(os.path.join(output_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
    if tokenizer:
        from lwm.tokenizer import resolve_tokenizer_file

        source = resolve_tokenizer_file(tokenizer)
        if storage.is_remote(source):
            with AtomicWriter(os.path.join(output_dir, "tokenizer.model")) as f:
                f.write(storage.read_bytes(source))
        else:
            shutil.copyfile(source, os.path.join(output_dir, "tokenizer.model"))
        with AtomicWriter(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}, f, indent=2)


def _save_bf16(shard: dict, path: str) -> None:
    try:
        import torch
        from safetensors.torch import save_file
    except ImportError:
        raise RuntimeError("bfloat16 output needs torch: pip install -e '.[torch]' "
                           "(or use --dtype=float32/float16)") from None
    save_file({k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16) for k, v in shard.items()},
              path, metadata={"format": "pt"})


# ---- Hugging Face -> LWM ---------------------------------------------------------------------


def config_from_hf(hf_dir: str, **overrides) -> LLaMAConfig:
    """Our config from a Hugging Face Llama config.json."""
    check_local_folder("hf_dir", hf_dir, output=False)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"{hf_dir}: model_type {hf.get('model_type')!r} is not 'llama'")
    if hf.get("rope_scaling"):
        raise ValueError(f"{hf_dir}: rope_scaling {hf['rope_scaling']} is not supported by LWM models")
    theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        max_sequence_length=hf.get("max_position_embeddings", 4096), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        theta=float(theta), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(hf.get(key), int):
            fields[key] = hf[key]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise ValueError(f"{hf_dir}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return LLaMAConfig(**fields).replace(**overrides)


class HFTensors:
    """Read tensors of a Hugging Face folder (safetensors shards or pytorch_model.bin) by name."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        self._where: dict[str, str] = {}
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(os.path.join(hf_dir, f), framework="flax") as handle:
                    for k in handle.keys():
                        self._where[k] = f
            self._bin = None
        else:
            bins = sorted(f for f in os.listdir(hf_dir) if re.fullmatch(r"pytorch_model.*\.bin", f))
            if not bins:
                raise FileNotFoundError(f"{hf_dir} holds no *.safetensors or pytorch_model*.bin weights")
            try:
                import torch
            except ImportError:
                raise RuntimeError(f"{hf_dir}: reading pytorch_model*.bin needs torch: "
                                   "pip install -e '.[torch]'") from None

            self._bin = {}
            for f in bins:
                self._bin.update(torch.load(os.path.join(hf_dir, f), map_location="cpu", weights_only=True))
            self._where = {k: "" for k in self._bin}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.hf_dir}: no tensor named {name}")
        if self._bin is not None:
            return self._bin[name].float().numpy()
        from safetensors import safe_open

        with safe_open(os.path.join(self.hf_dir, self._where[name]), framework="flax") as handle:
            return np.asarray(handle.get_tensor(name), np.float32)


def iter_hf_as_lwm(hf_dir: str, config: LLaMAConfig, scan_layers: bool, param_scan_axis: int = 0):
    """(lwm key path, tensor) for every parameter, stacked per name when scan_layers."""
    tensors = HFTensors(hf_dir)
    expected = {name for name in _TOP_KEYS.values()} | {
        f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in _LAYER_KEYS.values()}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    present = {n for n in tensors.names() if not n.endswith("rotary_emb.inv_freq")}
    missing, extra = sorted(expected - present), sorted(present - expected - {"lm_head.weight"})
    if missing or extra:
        raise ValueError(f"{hf_dir} does not match its config: missing {missing[:10]}, unexpected {extra[:10]}")
    for key, name in _TOP_KEYS.items():
        if key == ("lm_head", "kernel") and config.tie_word_embeddings:
            continue
        yield key, hf_to_lwm_tensor(key, tensors.get(name), config)
    for inner, name in _LAYER_KEYS.items():
        layers = [hf_to_lwm_tensor(inner, tensors.get(f"model.layers.{i}.{name}"), config)
                  for i in range(config.num_hidden_layers)]
        if scan_layers:
            yield ("transformer", "h", "scan_decoder") + inner, np.stack(layers, axis=param_scan_axis)
        else:
            for i, t in enumerate(layers):
                yield ("transformer", "h", str(i)) + inner, t


def convert_hf_to_lwm(hf_dir: str, output_checkpoint: str, output_config: str, scan_layers: bool = True,
                      param_scan_axis: int = 0, float_dtype=None) -> LLaMAConfig:
    """Write LWM streaming params and a config JSON (`--load_llama_config=json::PATH`)."""
    import msgpack
    from flax.serialization import to_bytes

    config = config_from_hf(hf_dir, scan_layers=scan_layers, param_scan_axis=param_scan_axis)
    packer = msgpack.Packer()
    with AtomicWriter(output_checkpoint) as f:
        for key, tensor in iter_hf_as_lwm(hf_dir, config, scan_layers, param_scan_axis):
            f.write(packer.pack((list(key), to_bytes(cast_floats(np.asarray(tensor), float_dtype)))))
    config.save_json(output_config)
    return config

