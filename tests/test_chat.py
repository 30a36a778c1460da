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


@pytest.fixture(scope="module")
def chat():
    from lwm.config import LLaMAConfig
    from lwm.loading import load_model

    flags = LLaMAConfig.get_default_config(dict(scan_query_chunk_size=32, scan_key_chunk_size=32,
                                                scan_mlp_chunk_size=32))
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
