"""Build what every inference entry point needs from its flags: mesh, tokenizer, config,
model, and parameters sharded onto the mesh (streamed from a checkpoint, or random).

    loaded = load_model(mesh_dim="1,-1,1,1", dtype="fp32", load_llama_config="7b",
                        update_llama_config="dict(theta=1e7)", llama_flags=FLAGS.llama,
                        load_checkpoint="params::/path/streaming_params", tokenizer="builtin")
    loaded.model.apply({'params': loaded.params}, ids)

`check_model_files(flags)` checks the checkpoint and tokenizer they name first, so a typo
costs a second, not a model build.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from absl import app
from jax.sharding import Mesh, NamedSharding

from lwm.checkpoint import LOAD_TYPES, flat_fns, float_dtype_by_name, load_checkpoint
from lwm.cli import check_input_files, naming
from lwm.config import LLaMAConfig, VideoLLaMAConfig, build_config_with_sources, describe_runtime_fields
from lwm.llama import LLaMAForCausalLM, init_params
from lwm.mesh import build_mesh, make_shard_and_gather_fns, match_partition_rules, partition_rules, sharding_table
from lwm.tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer_file

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    config: LLaMAConfig
    model: Any  # LLaMAForCausalLM or VideoLLaMAForCausalLM bound to the mesh
    params: Any  # sharded parameters
    param_specs: Any  # PartitionSpec tree
    mesh: Mesh
    tokenizer: Tokenizer


def compute_dtype(name: str):
    dtype = float_dtype_by_name(name)
    if dtype is None:
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {name!r}")
    return dtype


def model_class(config: LLaMAConfig):
    if isinstance(config, VideoLLaMAConfig):
        from lwm.vision_llama import VideoLLaMAForCausalLM

        return VideoLLaMAForCausalLM
    return LLaMAForCausalLM


def model_flag_defaults(vision: bool = False, seed: int = 1234) -> dict[str, Any]:
    """The flags every inference entry point shares, with the original's names and defaults."""
    from lwm.distributed import JaxDistributedConfig
    from lwm.tokenizer import DEFAULT_TOKENIZER

    return dict(seed=seed, mesh_dim="1,-1,1,1", dtype="fp32", load_llama_config="", update_llama_config="",
                load_checkpoint="", tokenizer=DEFAULT_TOKENIZER,
                llama=(VideoLLaMAConfig if vision else LLaMAConfig).get_default_config(),
                jax_distributed=JaxDistributedConfig.get_default_config())


def checkpoint_file(spec: str, flag: str = "--load_checkpoint") -> str:
    """The file of a `TYPE::PATH` checkpoint spec ('' when there is none); a bad TYPE raises."""
    if not spec:
        return ""
    kind, sep, path = spec.partition("::")
    if not sep or kind not in LOAD_TYPES:
        raise ValueError(f"{flag}={spec!r}: expected TYPE::PATH with TYPE one of {', '.join(LOAD_TYPES)}")
    return path


def check_model_files(flags) -> None:
    """The checkpoint and tokenizer of the `model_flag_defaults` flags exist, before a model is built."""
    check_input_files([("--load_checkpoint", checkpoint_file(flags.load_checkpoint))])
    resolve_tokenizer_file(flags.tokenizer)  # its errors name the tokenizer and the forms it takes


def load_model_from_flags(flags, vision: bool = False) -> LoadedModel:
    """`load_model` with the `model_flag_defaults` flags of an entry point."""
    return load_model(mesh_dim=flags.mesh_dim, dtype=flags.dtype, load_llama_config=flags.load_llama_config,
                      update_llama_config=flags.update_llama_config, llama_flags=flags.llama,
                      load_checkpoint_spec=flags.load_checkpoint, tokenizer=flags.tokenizer, vision=vision,
                      seed=flags.seed, explicit_llama_flags=flags.explicit("llama"))


def load_model(*, mesh_dim: str = "1,-1,1,1", dtype: str = "fp32", load_llama_config: str = "",
               update_llama_config: str = "", llama_flags=None, load_checkpoint_spec: str = "",
               tokenizer: str = "", vision: bool = False, seed: int = 0,
               explicit_llama_flags=None) -> LoadedModel:
    """Everything an inference entry point needs; params are random (with a warning) when
    no checkpoint is given, which is how tests and demos run tiny models. `explicit_llama_flags`:
    the `--llama.*` names given on the command line (a config file's run-time fields win over
    the others); None = all of `llama_flags` when given, none otherwise."""
    with naming("--mesh_dim"):
        mesh = build_mesh(mesh_dim)
    with naming("--dtype"):
        compute_dtype(dtype)
    tok = load_tokenizer(tokenizer)
    cls = VideoLLaMAConfig if vision else LLaMAConfig
    flags = llama_flags if llama_flags is not None else cls.get_default_config()
    if llama_flags is None:
        explicit_llama_flags = ()
    try:
        # With a checkpoint its shapes win (the original's eval never grew vocab_size); random
        # weights grow it so that any token of the tokenizer has a row.
        config, sources = build_config_with_sources(load_llama_config, flags, update_llama_config, tok, mesh_dim,
                                                    cls, grow_vocab=not load_checkpoint_spec,
                                                    explicit=explicit_llama_flags)
    except ValueError as e:  # a bad --llama.* / --update_llama_config: one line, not a traceback
        raise app.UsageError(str(e)) from None
    log.info("run-time fields: %s", describe_runtime_fields(config, sources))
    config.check_mesh(dict(mesh.shape))
    if config.vocab_size < tok.vocab_size:
        log.warning("vocab_size %d < the tokenizer's %d: prompts with ids >= %d are refused", config.vocab_size,
                    tok.vocab_size, config.vocab_size)
    model = model_class(config)(config, dtype=compute_dtype(dtype), mesh=mesh)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(seed), model_class(config)))
    specs = match_partition_rules(partition_rules(config.scan_layers, config.param_scan_axis), shapes)
    if load_checkpoint_spec:
        shard_fns, _ = make_shard_and_gather_fns(specs, mesh, compute_dtype(dtype))
        spec = load_checkpoint_spec
        if spec.startswith("trainstate::"):  # inference reads only the params of a train state
            spec = "trainstate_params::" + spec.split("::", 1)[1]
        _, params = load_checkpoint(spec, params_target=shapes, params_shard_fns=flat_fns(shard_fns))
    else:
        log.warning("no --load_checkpoint given: using random weights")
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(compute_dtype(dtype)),
                                              init_params(config, jax.random.key(seed), model_class(config))),
                         out_shardings=shardings)()
    log.info("%s: %.1fM parameters on mesh %s; attention: %s kernel (attention_impl=%s), k/v across sp=%d: "
             "sp_attention=%s", type(config).__name__, config.num_params() / 1e6, dict(mesh.shape),
             config.resolved_attention_impl(), config.attention_impl, mesh.shape["sp"], config.sp_attention)
    log.debug("parameters:\n%s", sharding_table(shapes, specs, mesh))
    return LoadedModel(config, model, params, specs, mesh, tok)
