"""Text chat with an LWM-Text-Chat model, streaming the answer as it is generated.

    python -m lwm.chat --load_llama_config=7b --load_checkpoint=params::/path/streaming_params \\
        --update_llama_config="dict(theta=50000000,max_sequence_length=1048576)" \\
        --tokenizer=LargeWorldModel/LWM-Text-1M --prompt="What is RingAttention?"
    python -m lwm.chat ... < questions.txt        # interactive: one question a line, until EOF or 'exit'

Each question is asked on its own with LWM's chat template
(`You are a helpful assistant. USER: {question} ASSISTANT:`, BOS first), which is the only
format the released chat models were trained on; answers stop at eos or --max_new_tokens.
Sampling: --temperature (0 = greedy), --top_k, --top_p. Tokens come from the shared sampler
(`lwm.generation.Sampler.stream`, a Python loop over the same jitted step that
`Sampler.generate` loops over), so text appears as it is generated.
"""
from __future__ import annotations

import sys
from typing import Iterator, TextIO

from absl import app

CHAT_TEMPLATE = "You are a helpful assistant. USER: {question} ASSISTANT:"
EXIT_WORDS = ("exit", "quit")


def chat_prompt(question: str) -> str:
    return CHAT_TEMPLATE.format(question=question)


class TextChat:
    """Answers questions with a loaded model (`lwm.loading.load_model`), streaming text."""

    def __init__(self, loaded, max_new_tokens: int = 512, temperature: float = 0.2, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 1234):
        from lwm.generation import Sampler

        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.sampler = Sampler(loaded.model, loaded.params, mesh=loaded.mesh)
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.seed = seed
        self.asked = 0

    def answer_stream(self, question: str) -> Iterator[str]:
        """Yield pieces of the answer's text as tokens arrive (eos ends it, not shown)."""
        import jax
        import numpy as np

        from lwm.generation import SamplingParams, padded_prompt_length, room_error, room_for_new_tokens

        tok = self.tokenizer
        ids = tok.encode(chat_prompt(question), add_bos=True)
        room = room_for_new_tokens(padded_prompt_length(len(ids), self.loaded.config, self.loaded.mesh),
                                   self.loaded.config, self.loaded.mesh)
        if room <= 0:
            raise ValueError(room_error("the question (in the chat template)", len(ids), 1, self.loaded.config,
                                        self.loaded.mesh, fixes="a shorter question"))
        sampling = SamplingParams(max_new_tokens=min(self.max_new_tokens, room), temperature=self.temperature,
                                  top_k=self.top_k, top_p=self.top_p, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.eos_token_id)
        rng = jax.random.fold_in(jax.random.key(self.seed), self.asked)
        self.asked += 1
        answer: list[int] = []
        shown = ""
        for step_tokens in self.sampler.stream(np.asarray([ids]), np.ones((1, len(ids)), np.int32), rng, sampling):
            token = int(step_tokens[0])
            if token == tok.eos_token_id:
                break
            answer.append(token)
            text = tok.decode(answer)
            # a multi-byte character split over byte tokens decodes to U+FFFD until it is complete
            if text.startswith(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        text = tok.decode(answer)
        if text != shown:
            yield text[len(shown):] if text.startswith(shown) else "\n" + text

    def answer(self, question: str) -> str:
        return "".join(self.answer_stream(question))


def run_chat(chat: TextChat, prompt: str, stdin: TextIO, stdout: TextIO, interactive_prompt: bool) -> None:
    """One-shot when `prompt` is given, else one question per stdin line until EOF or 'exit'."""
    def ask(question: str) -> None:
        stdout.write(f"Question: {question}\nAnswer: ")
        stdout.flush()
        for piece in chat.answer_stream(question):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()

    if prompt:
        ask(prompt)
        return
    while True:
        if interactive_prompt:
            sys.stderr.write("USER> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line:
            return
        question = line.strip()
        if question.lower() in EXIT_WORDS:
            return
        if question:
            ask(question)


def _define_flags():
    from lwm.flags import define_flags_with_default
    from lwm.loading import model_flag_defaults

    return define_flags_with_default(prompt="", max_new_tokens=512, temperature=0.2, top_k=0, top_p=1.0,
                                     **model_flag_defaults())


FLAGS = None  # defined when run as a program, so importing TextChat defines no flags


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lwm.distributed import JaxDistributedConfig
    from lwm.loading import check_model_files, load_model_from_flags

    check_model_files(FLAGS)
    JaxDistributedConfig.initialize(FLAGS.jax_distributed)
    loaded = load_model_from_flags(FLAGS)
    chat = TextChat(loaded, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                    top_p=FLAGS.top_p, seed=FLAGS.seed)
    run_chat(chat, FLAGS.prompt, sys.stdin, sys.stdout, interactive_prompt=sys.stdin.isatty())


if __name__ == "__main__":
    from lwm import cli

    FLAGS, FLAGS_DEF = _define_flags()
    cli.run(main)
