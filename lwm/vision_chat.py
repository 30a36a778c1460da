"""Ask a video-language model about an image or a video: `python -m lwm.vision_chat`.

    python -m lwm.vision_chat --prompt="What is the video about?" --input_file=clip.mp4 \\
        --vqgan_checkpoint=vqgan.pkl --load_llama_config=7b --max_n_frames=8 \\
        --update_llama_config="dict(sample_mode='text',theta=50000000,max_sequence_length=131072)" \\
        --load_checkpoint=params::LWM-Chat-1M/params --tokenizer=LWM-Chat-1M/tokenizer.model
    Question: What is the video about?
    Answer: ...
    python -m lwm.vision_chat ... --questions_file=questions.jsonl --output_file=answers.jsonl

List mode: each line of --questions_file is {"id", "input_file", "question"} (optional
"max_n_frames"; paths relative to the list); each answer is appended to --output_file as the
job's line plus "answer", and a rerun answers only the ids not there yet.

The input is read as LWM read it (`lwm.vision_io.read_vision`): a png/jpg is
one frame; a video keeps at most `max_n_frames` frames picked with
`np.linspace(0, n - 1, k).astype(int)`; each frame is resized (short side 256), center-cropped
and scaled to [-1, 1], then turned into 16 x 16 VQGAN codes. The token stream is the one the
released checkpoints were trained on, BOS of every `encode` call included:

    encode('<s>You are a helpful assistant. USER: {question}\\n')   -> [1, 1, ...]
    encode('<vision>')                                              -> [1, 523, 9824, 28767]
    frame 1 codes (256), 8192, ..., frame k codes (256), 8193       (vision mask True here only)
    encode('</vision>')                                             -> [1, 1867, 9824, 28767]
    encode(' ASSISTANT:')                                           -> [1, 28705, 8602, 8048, 12738, 28747]

left-padded to a multiple of the attention block size (`max(scan_query_chunk_size,
scan_key_chunk_size) * sp` for power-of-two chunks). The answer is sampled at `--temperature`
(0.2) from the text head, one token at a time through the KV cache, until eos or
`--max_new_tokens` (0: the block size, as LWM did).

`--vqgan_checkpoint` is a pickle of the VQGAN's params; `--vqgan_config` is '' for LWM's
VQGAN or a JSON file / string of `lwm.vqgan.VQGANConfig` fields (tiny VQGANs for tests and
demos; frames are then read at that config's resolution). `--input_file` and the VQGAN files may
be bucket URLs (`gs://bucket/clip.mp4`): the input is copied to a local temp file for its decoder.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np
from absl import app

from lwm import cli
from lwm.distributed import JaxDistributedConfig
from lwm.flags import define_flags_with_default
from lwm.generation import Sampler, SamplingParams, block_size, padded_prompt_length, room_error
from lwm.loading import LoadedModel, check_model_files, load_model_from_flags, model_flag_defaults
from lwm.tokenizer import Tokenizer
from lwm.vision_io import read_vision
from lwm.vqgan import VQGAN, VQGANConfig, vqgan_config_file

log = logging.getLogger("lwm.vision_chat")

END_OF_FRAME = 8192  # vision token after every frame but the last
END_OF_VISION = 8193  # vision token after the last frame
SYSTEM_PROMPT = "<s>You are a helpful assistant. USER: {question}\n"
VISION_START, VISION_END, ANSWER_CUE = "<vision>", "</vision>", " ASSISTANT:"

FLAGS, FLAGS_DEF = define_flags_with_default(
    prompt="",  # the question
    input_file="",  # a png/jpg image or a video decord (or imageio's ffmpeg) can read
    vqgan_checkpoint="",  # pickle of the VQGAN params
    vqgan_config="",  # '' = LWM's VQGAN; else a JSON file or string of VQGANConfig fields
    temperature=0.2,
    max_n_frames=8,  # longer videos are sampled uniformly down to this many frames
    max_new_tokens=0,  # answer length limit; 0 = the attention block size (LWM's choice)
    questions_file="",  # list mode: JSONL of {"id", "input_file", "question"} (paths relative to the list)
    output_file="",  # list mode: JSONL of answers, one a line (a rerun skips the ids already there)
    **model_flag_defaults(vision=True),
)


class PromptTooLongError(ValueError):
    """The question and frames do not fit the model's max_sequence_length."""


@dataclasses.dataclass
class ChatInput:
    """One left-padded prompt row; all arrays [1, length]."""

    input_ids: np.ndarray  # int32
    vision_masks: np.ndarray  # bool: True on frame codes and the 8192/8193 markers
    attention_mask: np.ndarray  # int32: 1 on real tokens, 0 on left padding
    n_frames: int


def frame_tokens(codes: np.ndarray) -> list[int]:
    """VQGAN codes [n_frames, h, w] -> each frame's codes row by row, then 8192 (8193 after the last).

    >>> frame_tokens(np.array([[[5, 6]], [[7, 8]]]))
    [5, 6, 8192, 7, 8, 8193]
    """
    codes = np.asarray(codes)
    if codes.ndim < 2 or codes.shape[0] == 0:
        raise ValueError(f"expected codes [n_frames >= 1, ...], got shape {codes.shape}")
    tokens: list[int] = []
    for i, frame in enumerate(codes.reshape(codes.shape[0], -1)):
        tokens.extend(int(c) for c in frame)
        tokens.append(END_OF_VISION if i == codes.shape[0] - 1 else END_OF_FRAME)
    return tokens


def chat_tokens(tokenizer: Tokenizer, question: str, codes: np.ndarray) -> tuple[list[int], list[bool]]:
    """The unpadded section-11 stream for a question about frames with `codes` [n_frames, h, w]:
    (token ids, vision mask). Each text piece is its own `encode` call with a BOS, as in LWM."""
    pieces = [
        (tokenizer.encode(SYSTEM_PROMPT.format(question=question), add_bos=True), False),
        (tokenizer.encode(VISION_START, add_bos=True), False),
        (frame_tokens(codes), True),
        (tokenizer.encode(VISION_END, add_bos=True), False),
        (tokenizer.encode(ANSWER_CUE, add_bos=True), False),
    ]
    tokens = [t for ids, _ in pieces for t in ids]
    vision = [is_vision for ids, is_vision in pieces for _ in ids]
    return tokens, vision


def pad_chat_input(tokens: list[int], vision: list[bool], length: int, pad_token_id: int, n_frames: int) -> ChatInput:
    """Left-pad one stream to `length` (padding is masked out and never seen by real tokens)."""
    if len(tokens) > length:
        raise ValueError(f"cannot left-pad {len(tokens)} tokens to the shorter length {length}")
    pad = length - len(tokens)
    ids = np.array([[pad_token_id] * pad + list(tokens)], np.int32)
    vision_masks = np.array([[False] * pad + list(vision)], bool)
    attention_mask = np.array([[0] * pad + [1] * len(tokens)], np.int32)
    return ChatInput(ids, vision_masks, attention_mask, n_frames)


def load_vqgan(checkpoint: str, config_spec: str = "") -> VQGAN:
    """The VQGAN from `--vqgan_checkpoint` (pickled params) and `--vqgan_config` ('' = LWM's)."""
    if not checkpoint:
        raise ValueError("--vqgan_checkpoint is required: the pickled params of the VQGAN image tokenizer")
    # One local device: the VQGAN is small next to the LLM, and this works the same on every host.
    return VQGAN(checkpoint, VQGANConfig.from_json(config_spec))


class VisionChat:
    """A loaded video-language model, its tokenizer and VQGAN, and the shared sampler."""

    def __init__(self, loaded: LoadedModel, vqgan: VQGAN, temperature: float = 0.2, max_new_tokens: int = 0):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.vqgan = vqgan
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens or block_size(self.config, loaded.mesh)
        self.sampler = Sampler(loaded.model, loaded.params, mesh=loaded.mesh)

    def encode_vision(self, path: str, max_n_frames: int) -> np.ndarray:
        """VQGAN codes [n_frames, h, w] of an image or video file."""
        frames = read_vision(path, max_n_frames, size=self.vqgan.config.resolution)  # [k, H, W, 3]
        _, codes = self.vqgan.encode(frames)
        return np.asarray(jax.device_get(codes))

    def build_input(self, question: str, codes: np.ndarray) -> ChatInput:
        """The section-11 stream, left-padded to a multiple of the block size; checks it fits."""
        tokens, vision = chat_tokens(self.tokenizer, question, codes)
        length = padded_prompt_length(len(tokens), self.config, self.loaded.mesh)
        needed = length + self.max_new_tokens
        if needed > self.config.max_sequence_length:
            raise PromptTooLongError(room_error(
                f"the prompt ({codes.shape[0]} frames x {codes[0].size + 1} vision tokens plus the question and "
                "markers)", len(tokens), self.max_new_tokens, self.config, self.loaded.mesh,
                fixes="fewer frames (--max_n_frames), a shorter question, a smaller --max_new_tokens"))
        return pad_chat_input(tokens, vision, length, self.tokenizer.pad_token_id, codes.shape[0])

    def generate(self, batch: ChatInput, rng) -> np.ndarray:
        """Answer tokens [n] (eos included when reached) for a built input."""
        sampling = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        start = time.perf_counter()
        out = self.sampler.generate(batch.input_ids, batch.attention_mask, rng, sampling,
                                    vision_masks=batch.vision_masks, sample_mode="text")
        seconds = time.perf_counter() - start
        n = int(out.lengths[0])
        log.info("%d frames, prompt %d tokens (padded %d); generated %d tokens in %.2f s (%.1f tokens/s, "
                 "compilation included on the first call)", batch.n_frames, int(batch.attention_mask.sum()),
                 batch.input_ids.shape[1], n, seconds, n / max(seconds, 1e-9))
        return out.tokens[0, :n]

    def answer(self, question: str, input_file: str, max_n_frames: int = 8, rng=None) -> str:
        """The model's answer to `question` about the image or video at `input_file`."""
        batch = self.build_input(question, self.encode_vision(input_file, max_n_frames))
        tokens = self.generate(batch, jax.random.key(0) if rng is None else rng)
        return decode_answer(self.tokenizer, tokens)


def decode_answer(tokenizer: Tokenizer, tokens) -> str:
    """Text of the generated tokens up to (not including) the first eos."""
    tokens = [int(t) for t in tokens]
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    jobs = None
    if FLAGS.questions_file:
        from lwm.jobs import read_jobs

        if not FLAGS.output_file:
            raise app.UsageError("--questions_file needs --output_file (the answers, one JSON line each)")
        cli.check_input_files([("--questions_file", FLAGS.questions_file)])
        cli.check_output_file("--output_file", FLAGS.output_file)
        jobs = read_jobs(FLAGS.questions_file, ("id", "input_file", "question"), paths=("input_file",))
        cli.check_input_files([(f"--questions_file (id {j['id']})", j["input_file"]) for j in jobs])
    else:
        if not FLAGS.prompt:
            raise app.UsageError("--prompt is required (the question to ask), or --questions_file")
        if not FLAGS.input_file:
            raise app.UsageError("--input_file is required (an image or a video)")
        cli.check_input_files([("--input_file", FLAGS.input_file)])
    if not FLAGS.vqgan_checkpoint:
        raise app.UsageError("--vqgan_checkpoint is required: the pickled params of the VQGAN image tokenizer")
    cli.check_input_files([("--vqgan_checkpoint", FLAGS.vqgan_checkpoint),
                           ("--vqgan_config", vqgan_config_file(FLAGS.vqgan_config))])
    check_model_files(FLAGS)
    JaxDistributedConfig.initialize(FLAGS.jax_distributed)
    vqgan = load_vqgan(FLAGS.vqgan_checkpoint, FLAGS.vqgan_config)
    loaded = load_model_from_flags(FLAGS, vision=True)
    chat = VisionChat(loaded, vqgan, FLAGS.temperature, FLAGS.max_new_tokens)
    if jobs is not None:
        answer_list(chat, jobs, FLAGS.output_file, FLAGS.max_n_frames, FLAGS.seed)
        return
    answer = chat.answer(FLAGS.prompt, FLAGS.input_file, FLAGS.max_n_frames, jax.random.key(FLAGS.seed))
    if jax.process_index() == 0:
        print(f"Question: {FLAGS.prompt}\nAnswer: {answer}", flush=True)


def answer_list(chat: VisionChat, jobs: list[dict], output_file: str, max_n_frames: int, seed: int) -> None:
    """Answer every job without a line in output_file yet, appending {..job, "answer"} lines."""
    from tqdm import tqdm

    from lwm.jobs import ResultWriter

    with ResultWriter(output_file) as out:
        todo = [(i, j) for i, j in enumerate(jobs) if j["id"] not in out.done]
        for index, job in tqdm(todo, desc="vision_chat", disable=jax.process_index() != 0):
            # by the job's place in the list: the same on every process, and after a resume
            rng = jax.random.fold_in(jax.random.key(seed), index)
            answer = chat.answer(job["question"], job["input_file"], int(job.get("max_n_frames", max_n_frames)), rng)
            if jax.process_index() == 0:
                out.write({**job, "answer": answer})
    if jax.process_index() == 0:
        print(f"answers: {output_file} ({len(jobs)} questions, {len(todo)} answered now)", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cli.run(main)
