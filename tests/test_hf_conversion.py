"""Conversion scripts: ours -> HF -> ours is exact, HF loads our output, PyTorch sampling agrees."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lwm.checkpoint import load_streaming, save_streaming
from lwm.config import load_config
from lwm.hf_conversion import rope_rows_to_hf
from lwm.llama import LLaMAForCausalLM, init_params
from tests.helpers import max_rel_error, random_ids, tiny_config, unstack_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rope_permutation_by_hand():
    # head_dim 4, 2 heads: interleaved rows (0,1),(2,3) per head -> halves [0,2,1,3] per head.
    assert rope_rows_to_hf(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def run_script(name, *args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_through_the_scripts(tmp_path, scan):
    config = tiny_config(num_key_value_heads=2, theta=5e5, bos_token_id=1, eos_token_id=2)
    params = init_params(config, jax.random.key(0))
    if not scan:
        params = unstack_layers(params, config.num_hidden_layers)
        config = config.replace(scan_layers=False)
    save_streaming(str(tmp_path / "streaming_params"), params)
    config.save_json(str(tmp_path / "config.json"))
    hf_dir = tmp_path / "hf"
    run_script("convert_lwm_to_hf.py", f"--load_checkpoint=params::{tmp_path}/streaming_params",
               f"--load_llama_config=json::{tmp_path}/config.json", f"--output_dir={hf_dir}", "--tokenizer=builtin")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(hf_dir))
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: oct(os.stat(hf_dir / f).st_mode & 0o777) for f in os.listdir(hf_dir)}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))  # safetensors alone would write 0600
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = random_ids(3, (2, 16), config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    ours = LLaMAForCausalLM(config.replace(attention_impl="dense")).apply({"params": params}, ids).logits
    assert max_rel_error(ours, ref) <= 1e-4
    run_script("convert_hf_to_lwm.py", f"--hf_model={hf_dir}", f"--output_checkpoint={tmp_path}/back",
               f"--output_config={tmp_path}/back.json", f"--scan_layers={scan}")
    back = load_streaming(str(tmp_path / "back"))
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    back_config = load_config(f"json::{tmp_path}/back.json")
    assert (back_config.theta, back_config.num_key_value_heads, back_config.scan_layers) == (5e5, 2, scan)


def test_sample_pyt_matches_our_greedy_decoding(tmp_path):
    from scripts.sample_pyt import generate

    config = tiny_config(vocab_size=32000, bos_token_id=1, eos_token_id=2)
    params = init_params(config, jax.random.key(1))
    save_streaming(str(tmp_path / "p"), params)
    from lwm.hf_conversion import convert_lwm_to_hf
    from lwm.tokenizer import load_tokenizer

    convert_lwm_to_hf(str(tmp_path / "p"), config, str(tmp_path / "hf"), tokenizer="builtin")
    text = generate(str(tmp_path / "hf"), "The special magic number is", max_new_tokens=6)
    tok = load_tokenizer("builtin")
    ids = tok.encode("The special magic number is", add_bos=True)
    model = LLaMAForCausalLM(config.replace(attention_impl="dense"))
    for _ in range(6):  # greedy by repeated full forwards
        logits = model.apply({"params": params}, jnp.asarray([ids])).logits
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert text == tok.decode(ids[-6:])


def test_the_converter_reads_a_checkpoint_and_config_from_a_bucket(tmp_path, bucket_dir):
    """The run's files in a GCS bucket (an emulator, through the real gcsfs): convert_lwm_to_hf.py
    reads the checkpoint and config from gs:// and writes the same Hugging Face weights as from
    a local copy; a missing object is one line naming it."""
    from lwm import storage

    config = tiny_config(num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    params = init_params(config, jax.random.key(1))
    save_streaming(f"{bucket_dir}/streaming_params", params)
    config.save_json(str(tmp_path / "config.json"))
    storage.write_bytes(f"{bucket_dir}/config.json", (tmp_path / "config.json").read_bytes())
    run_script("convert_lwm_to_hf.py", f"--load_checkpoint=params::{bucket_dir}/streaming_params",
               f"--load_llama_config=json::{bucket_dir}/config.json", f"--output_dir={tmp_path / 'hf'}",
               "--tokenizer=builtin")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = random_ids(4, (2, 16), config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    ours = LLaMAForCausalLM(config.replace(attention_impl="dense")).apply({"params": params}, ids).logits
    assert max_rel_error(ours, ref) <= 1e-4
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_lwm_to_hf.py"),
                           f"--load_checkpoint=params::{bucket_dir}/missing", f"--output_dir={tmp_path / 'x'}",
                           f"--load_llama_config=json::{tmp_path}/config.json"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"convert_lwm_to_hf.py: --load_checkpoint: no such object: {bucket_dir}/missing"
