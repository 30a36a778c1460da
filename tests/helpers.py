"""Small builders shared by tests: tiny configs, random params, HF reference models."""
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lwm.config import LLaMAConfig


def tiny_config(**overrides) -> LLaMAConfig:
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_sequence_length=128,
                scan_query_chunk_size=8, scan_key_chunk_size=8, scan_mlp_chunk_size=8,
                scan_loss_chunk_size=8)
    base.update(overrides)
    return LLaMAConfig(**base)


def unstack_layers(params, num_layers: int, axis: int = 0):
    """Scanned params -> the same weights in the unscanned tree (transformer/h/0, /1, ...)."""
    out = {}
    for key, value in flatten_dict(params).items():
        if "scan_decoder" in key:
            for i in range(num_layers):
                out[tuple(str(i) if k == "scan_decoder" else k for k in key)] = np.take(np.asarray(value), i, axis=axis)
        else:
            out[key] = value
    return unflatten_dict(out)


def max_rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_max_rel_error(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(max_rel_error, a, b)))


def random_ids(key, shape, vocab):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


def run_script_with_fake_python(tmp_path, script: str, all_calls: bool = False, **env_vars):
    """Run scripts/<script> with a `python3` (and $PYTHON) that only records its arguments;
    returns the arguments of the last python call (of every call with all_calls=True)."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$ARGS_OUT"\nprintf "\\036" >> "$ARGS_OUT"\n')
    fake.chmod(0o755)
    args_out = tmp_path / "args"
    if args_out.exists():
        args_out.unlink()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ARGS_OUT=str(args_out), PYTHON=str(fake),
               **env_vars)
    result = subprocess.run(["bash", os.path.join(root, "scripts", script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = [call.split("\0")[:-1] for call in args_out.read_text().split("\036")[:-1]]
    return calls if all_calls else calls[-1]


def survivor_stop_message(stderr: str) -> bool:
    """Whether a process that lost its peer said why it stopped: our line (its next collective
    failed) or jax's coordination service's (it reported the dead peer first; jax then aborts)."""
    ours = "another process has probably stopped" in stderr and "--autoresume=True" in stderr
    return ours or "another task died" in stderr
