"""Text chat: the template, streamed text equals the sampler's tokens, interactive stdin mode,
and `python -m lwm.chat --prompt=...` answering one question on a tiny random model."""
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lwm.chat import TextChat, chat_prompt, run_chat
from lwm.generation import SamplingParams
from lwm.mesh import cpu_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "dict(hidden_size=64,intermediate_size=96,num_attention_heads=4,max_sequence_length=256)"
CHUNKS = dict(scan_query_chunk_size=32, scan_key_chunk_size=32, scan_mlp_chunk_size=32)


@pytest.fixture(scope="module")
def chat():
    from lwm.config import LLaMAConfig
    from lwm.loading import load_model

    flags = LLaMAConfig.get_default_config(CHUNKS)
    loaded = load_model(mesh_dim="1,2,1,4", load_llama_config="debug", update_llama_config=TINY, llama_flags=flags,
                        tokenizer="builtin")
    return TextChat(loaded, max_new_tokens=12, temperature=0.0)


def test_template():
    assert chat_prompt("Why?") == "You are a helpful assistant. USER: Why? ASSISTANT:"


def test_streamed_answer_is_the_greedy_continuation(chat):
    tok = chat.tokenizer
    question = "What is the capital of France?"
    pieces = list(chat.answer_stream(question))
    ids = tok.encode(chat_prompt(question), add_bos=True)
    assert ids[:2] == [1, tok.encode("You")[0]]
    out = chat.sampler.generate(np.asarray([ids]), np.ones((1, len(ids)), np.int32), jax.random.key(0),
                                SamplingParams(max_new_tokens=12, temperature=0.0, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.eos_token_id))
    tokens = [t for t in out.tokens[0, :out.lengths[0]] if t != tok.eos_token_id]
    assert "".join(pieces) == tok.decode(tokens) and len(pieces) >= 1


def test_interactive_mode_reads_questions_until_exit(chat):
    stdin = io.StringIO("First question?\n\nSecond question?\nexit\nnever asked\n")
    stdout = io.StringIO()
    run_chat(chat, "", stdin, stdout, interactive_prompt=False)
    text = stdout.getvalue()
    assert text.count("Question: ") == 2 and text.count("Answer: ") == 2
    assert "Question: Second question?\nAnswer: " in text and "never asked" not in text
    expected = chat.answer("First question?")
    assert f"Question: First question?\nAnswer: {expected}\n" in text


def test_chat_cli_one_shot():
    cmd = [sys.executable, "-m", "lwm.chat", "--load_llama_config=debug", f"--update_llama_config={TINY}",
           "--llama.scan_query_chunk_size=32", "--llama.scan_key_chunk_size=32", "--llama.scan_mlp_chunk_size=32",
           "--tokenizer=builtin", "--prompt=Tell me a story.", "--max_new_tokens=6", "--temperature=0.7",
           "--top_p=0.9"]
    env = dict(os.environ, XLA_FLAGS=cpu_xla_flags(8), JAX_PLATFORMS="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "Question: Tell me a story." and lines[1].startswith("Answer: ")


def save_tiny_checkpoint(folder, update: str, train_state: bool = False) -> tuple[str, dict]:
    """A random `debug`+`update` model saved as a params:: file (or a whole train state)."""
    from lwm.checkpoint import save_streaming, train_state_dict
    from lwm.config import LLaMAConfig, build_config
    from lwm.llama import init_params

    params = init_params(build_config("debug", LLaMAConfig.get_default_config(CHUNKS), update), jax.random.key(1))
    path = os.path.join(folder, "streaming_train_state" if train_state else "streaming_params")
    save_streaming(path, train_state_dict(3, params, jax.tree.map(np.zeros_like, params)) if train_state else params)
    return path, params


def test_a_checkpoint_with_fewer_words_than_the_tokenizer_loads_and_samples(tmp_path):
    """At inference the checkpoint's vocab_size (1024) wins over the builtin tokenizer's 32000."""
    from lwm.config import LLaMAConfig
    from lwm.loading import load_model

    small = TINY[:-1] + ",vocab_size=1024)"
    path, params = save_tiny_checkpoint(str(tmp_path), small)
    loaded = load_model(mesh_dim="1,2,1,4", load_llama_config="debug", update_llama_config=small,
                        llama_flags=LLaMAConfig.get_default_config(CHUNKS), load_checkpoint_spec=f"params::{path}",
                        tokenizer="builtin")
    assert loaded.config.vocab_size == 1024 and loaded.tokenizer.vocab_size == 32000
    np.testing.assert_array_equal(np.asarray(loaded.params["lm_head"]["kernel"]), params["lm_head"]["kernel"])
    sampler = TextChat(loaded).sampler
    ids = np.array([[1, 5, 300, 1023]], np.int32)
    out = sampler.generate(ids, np.ones_like(ids), jax.random.key(0), SamplingParams(max_new_tokens=8))
    assert out.tokens.shape == (1, 8) and np.all((out.tokens >= 0) & (out.tokens < 1024))
    bad = np.array([[1, 5, 31999]], np.int32)  # a tokenizer id the model has no row for: refused, not garbage
    with pytest.raises(ValueError, match=r"prompt token id 31999 is outside the model's text vocabulary \[0, 1024\)"):
        sampler.generate(bad, np.ones_like(bad), jax.random.key(0), SamplingParams(max_new_tokens=4))


def test_a_train_state_given_as_params_names_the_type_that_reads_it(tmp_path):
    from lwm.config import LLaMAConfig
    from lwm.loading import load_model

    path, params = save_tiny_checkpoint(str(tmp_path), TINY, train_state=True)
    kwargs = dict(mesh_dim="1,2,1,4", load_llama_config="debug", update_llama_config=TINY,
                  llama_flags=LLaMAConfig.get_default_config(CHUNKS), tokenizer="builtin")
    with pytest.raises(ValueError) as err:
        load_model(load_checkpoint_spec=f"params::{path}", **kwargs)
    assert str(err.value) == (f"checkpoint {path} does not match the model: this file is a train state "
                              f"(keys opt_state/params/step): use trainstate_params::{path}")
    loaded = load_model(load_checkpoint_spec=f"trainstate_params::{path}", **kwargs)
    np.testing.assert_array_equal(np.asarray(loaded.params["lm_head"]["kernel"]), params["lm_head"]["kernel"])
