"""Text to image or video with a video-language model: `python -m lwm.vision_generation`.

    python -m lwm.vision_generation --prompt='Fireworks over the city' --output_file=fireworks.png \\
        --n_frames=1 --cfg_scale_image=5.0 --vqgan_checkpoint=vqgan.pkl --load_llama_config=7b \\
        --update_llama_config="dict(sample_mode='vision',theta=50000000,max_sequence_length=32768)" \\
        --load_checkpoint=params::LWM-Chat-1M/params --tokenizer=LWM-Chat-1M/tokenizer.model

`--output_file` picks the kind: `.png` / `.jpg` is one image (`--n_frames=1`), `.mp4` a video
of `--n_frames` > 1 frames at 4 fps. Token streams (LWM's; docs/vision_inference.md):

* Prompts are tokenized as a batch to 128 tokens: BOS, then the text's tokens (cut from the
  left when longer), left-padded. With classifier-free guidance (cfg_scale != 1) the batch is
  [conditional rows; unconditional rows], the unconditional prompt being `<s><vision>`, and
  each step samples from `uncond + cfg_scale * (cond - uncond)`; the token goes to both rows.
  With cfg_scale == 1 that mix is the conditional logits, so only the conditional rows run.
* Image (or a video's first frame): prompt
  `<s>You are a helpful assistant. USER: Generate an image of {prompt} ASSISTANT: <vision>`,
  257 tokens sampled from the vision head (256 codes, then the 257th forced to 8192, end of
  frame) with `--temperature_image`, `--top_k_image`, `--cfg_scale_image`.
* Video: prompt `... Generate a video of {prompt} ...` followed by the first frame's 257
  tokens (vision mask True), then (n_frames - 1) * 257 more tokens with the `_video` settings,
  every 257th forced to 8192. Each frame's codes (markers dropped) go through the VQGAN decoder.

The first frame comes from the image prompt, as in LWM. Files are written atomically (temp
file, then rename; to a bucket URL such as `gs://bucket/out.mp4`, encoded locally and uploaded
as one object). `--vqgan_config` ('' = LWM's VQGAN) allows tiny VQGANs for tests and
demos; frames per token block follow its code grid (257 for LWM's 16 x 16).

List mode: `--prompts_file=prompts.jsonl --output_dir=DIR`, one {"id", "prompt", "n_frames"}
a line (n_frames 1 = an image; an optional "cfg_scale" replaces --cfg_scale_image and
--cfg_scale_video for that prompt); prompts alike go through in batches of --batch_size and
each result is written to DIR/<id>.png or DIR/<id>.mp4 and listed in DIR/generated.jsonl, so a
rerun generates only the ids not listed yet.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
from absl import app

from lwm import cli
from lwm.distributed import JaxDistributedConfig
from lwm.flags import define_flags_with_default
from lwm.generation import Sampler, SamplingParams, cache_length, padded_prompt_length
from lwm.loading import LoadedModel, check_model_files, load_model_from_flags, model_flag_defaults
from lwm.tokenizer import Tokenizer
from lwm.vision_io import to_uint8, write_image, write_video
from lwm.vqgan import VQGAN, VQGANConfig, vqgan_config_file

log = logging.getLogger("lwm.vision_generation")

END_OF_FRAME = 8192  # forced after each frame's codes
PROMPT_LENGTH = 128  # tokens per prompt row (BOS + text, left-padded / cut from the left)
UNCONDITIONAL_PROMPT = "<s><vision>"
IMAGE_PROMPT = "<s>You are a helpful assistant. USER: Generate an image of {prompt} ASSISTANT: <vision>"
VIDEO_PROMPT = "<s>You are a helpful assistant. USER: Generate a video of {prompt} ASSISTANT: <vision>"
VIDEO_FPS = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_PROMPT = "Fireworks over the city"

FLAGS, FLAGS_DEF = define_flags_with_default(
    prompt=DEFAULT_PROMPT,
    output_file="",  # .png / .jpg: one image (n_frames=1); .mp4: a video (n_frames > 1)
    temperature_image=1.0,
    temperature_video=1.0,
    top_k_image=8192,
    top_k_video=100,
    cfg_scale_image=1.0,
    cfg_scale_video=1.0,
    vqgan_checkpoint="",  # pickle of the VQGAN params
    vqgan_config="",  # '' = LWM's VQGAN; else a JSON file or string of VQGANConfig fields
    n_frames=1,
    prompts_file="",  # list mode: JSONL of {"id", "prompt", "n_frames"}; outputs go to --output_dir
    output_dir="",  # list mode: <id>.png / <id>.mp4 and generated.jsonl (a rerun skips ids already there)
    batch_size=8,  # list mode: prompts generated together
    **model_flag_defaults(vision=True),
)


def check_output(output_file: str, n_frames: int) -> str:
    """'image' or 'video' for an output path and frame count; anything inconsistent raises."""
    if not output_file:
        raise ValueError("--output_file is required (.png/.jpg for an image, .mp4 for a video)")
    suffix = os.path.splitext(output_file)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        if n_frames != 1:
            raise ValueError(f"--output_file={output_file} is an image, so --n_frames must be 1, got {n_frames}")
        return "image"
    if suffix == ".mp4":
        if n_frames < 2:
            raise ValueError(f"--output_file={output_file} is a video, so --n_frames must be > 1, got {n_frames}")
        return "video"
    raise ValueError(f"--output_file={output_file}: unsupported suffix {suffix!r}; use .png, .jpg or .mp4")


def prompt_batch(tokenizer: Tokenizer, texts: list[str], length: int = PROMPT_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask) [len(texts), length]: BOS + each text's tokens, the text cut from the
    left when too long (BOS stays first, as the Hugging Face tokenizer LWM used truncates the
    text before adding special tokens), left-padded."""
    rows = [[tokenizer.bos_token_id] + tokenizer.encode(text)[-(length - 1):] for text in texts]
    return tokenizer.pad(rows, max_length=length, padding_side="left")


def cfg_prompts(prompts: list[str], template: str, cfg_scale: float) -> list[str]:
    """Conditional prompts, then (with guidance) as many unconditional ones."""
    conditional = [template.format(prompt=p) for p in prompts]
    return conditional + [UNCONDITIONAL_PROMPT] * len(prompts) if cfg_scale != 1.0 else conditional


def forced_markers(n_tokens: int, tokens_per_frame: int) -> np.ndarray:
    """[n_tokens] int32: -1 (sample) except 8192 at every tokens_per_frame-th step.

    >>> forced_markers(6, 3).tolist()
    [-1, -1, 8192, -1, -1, 8192]
    """
    forced = np.full((n_tokens,), -1, np.int32)
    forced[tokens_per_frame - 1::tokens_per_frame] = END_OF_FRAME
    return forced


class VisionGenerator:
    """A loaded video-language model, its tokenizer and VQGAN, and the shared sampler."""

    def __init__(self, loaded: LoadedModel, vqgan: VQGAN):
        self.loaded = loaded
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.vqgan = vqgan
        self.tokens_per_frame = vqgan.config.tokens_per_frame + 1  # codes + the end-of-frame marker
        self.sampler = Sampler(loaded.model, loaded.params, mesh=loaded.mesh)
        self.tokens_generated = 0
        self.seconds = 0.0

    def _check_fits(self, prompt_length: int, n_tokens: int, what: str) -> None:
        cache_length(padded_prompt_length(prompt_length, self.config, self.loaded.mesh), n_tokens, self.config,
                     self.loaded.mesh, unpadded=prompt_length, what=what,
                     fixes="fewer frames (--n_frames) or a shorter prompt")

    def _sample(self, ids, mask, vision_masks, rng, n_tokens: int, temperature: float, top_k: int,
                cfg_scale: float) -> np.ndarray:
        """[n prompts, n_tokens] vision tokens, 8192 forced at the end of every frame."""
        # Only the VQGAN's codes are sampled; the end-of-frame markers are forced.
        sampling = SamplingParams(max_new_tokens=n_tokens, temperature=temperature, top_k=top_k, cfg_scale=cfg_scale,
                                  eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id,
                                  vocab_limit=self.vqgan.config.num_embeddings)
        start = time.perf_counter()
        out = self.sampler.generate(ids, mask, rng, sampling, vision_masks=vision_masks, sample_mode="vision",
                                    forced_tokens=forced_markers(n_tokens, self.tokens_per_frame))
        self.seconds += time.perf_counter() - start
        self.tokens_generated += int(out.lengths.sum())
        return out.tokens

    def first_frames(self, prompts: list[str], rng, temperature: float = 1.0, top_k: int = 8192,
                     cfg_scale: float = 1.0) -> np.ndarray:
        """Image tokens [len(prompts), tokens_per_frame] (codes, then 8192) from the image prompt."""
        ids, mask = prompt_batch(self.tokenizer, cfg_prompts(prompts, IMAGE_PROMPT, cfg_scale))
        self._check_fits(ids.shape[1], self.tokens_per_frame, "the image prompt")
        return self._sample(ids, mask, np.zeros(ids.shape, bool), rng, self.tokens_per_frame, temperature, top_k,
                            cfg_scale)

    def continue_video(self, prompts: list[str], first: np.ndarray, n_frames: int, rng, temperature: float = 1.0,
                       top_k: int = 100, cfg_scale: float = 1.0) -> np.ndarray:
        """Video tokens [len(prompts), n_frames * tokens_per_frame]: `first` [len(prompts), tokens_per_frame]
        then (n_frames - 1) frames sampled after the video prompt and the first frame."""
        ids, mask = prompt_batch(self.tokenizer, cfg_prompts(prompts, VIDEO_PROMPT, cfg_scale))
        frame = np.concatenate([first, first]) if cfg_scale != 1.0 else first  # both rows of a cfg pair see it
        ids = np.concatenate([ids, frame.astype(np.int32)], axis=1)
        mask = np.concatenate([mask, np.ones(frame.shape, np.int32)], axis=1)
        vision_masks = np.concatenate([np.zeros(frame.shape[:1] + (PROMPT_LENGTH,), bool),
                                       np.ones(frame.shape, bool)], axis=1)
        n_tokens = (n_frames - 1) * self.tokens_per_frame
        self._check_fits(ids.shape[1], n_tokens, f"the prompt for a video of {n_frames} frames")
        rest = self._sample(ids, mask, vision_masks, rng, n_tokens, temperature, top_k, cfg_scale)
        return np.concatenate([first, rest], axis=1)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Vision tokens [rows, n_frames * tokens_per_frame] -> uint8 frames [rows, n_frames, H, W, 3]."""
        rows = tokens.shape[0]
        codes = tokens.reshape(rows, -1, self.tokens_per_frame)[:, :, :-1]  # drop the end-of-frame markers
        limit = self.vqgan.config.num_embeddings
        if ((codes < 0) | (codes >= limit)).any():  # sampling is limited to the codebook, so never
            raise ValueError(f"vision tokens outside the VQGAN codebook [0, {limit}) inside a frame")
        side = self.vqgan.config.latent_size
        pixels = self.vqgan.decode(codes.reshape(rows, -1, side, side))  # [rows, n_frames, H, W, 3] in [-1, 1]
        return to_uint8(np.asarray(jax.device_get(pixels)))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.prompts_file:
        return generate_list_main()
    try:
        kind = check_output(FLAGS.output_file, FLAGS.n_frames)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    prompt = FLAGS.prompt
    if not FLAGS.vqgan_checkpoint:
        raise app.UsageError("--vqgan_checkpoint is required: the pickled params of the VQGAN image tokenizer")
    cli.check_input_files([("--vqgan_checkpoint", FLAGS.vqgan_checkpoint),
                           ("--vqgan_config", vqgan_config_file(FLAGS.vqgan_config))])
    cli.check_output_file("--output_file", FLAGS.output_file)
    check_model_files(FLAGS)
    JaxDistributedConfig.initialize(FLAGS.jax_distributed)
    vqgan = VQGAN(FLAGS.vqgan_checkpoint, VQGANConfig.from_json(FLAGS.vqgan_config))
    loaded = load_model_from_flags(FLAGS, vision=True)
    generator = VisionGenerator(loaded, vqgan)
    frames = generate_frames(generator, [prompt], FLAGS.n_frames if kind == "video" else 1,
                             jax.random.key(FLAGS.seed))[0]  # [n_frames, H, W, 3] uint8
    log.info("generated %d vision tokens in %.2f s (%.1f tokens/s, compilation included)", generator.tokens_generated,
             generator.seconds, generator.tokens_generated / max(generator.seconds, 1e-9))
    if jax.process_index() == 0:
        if kind == "image":
            write_image(FLAGS.output_file, frames[0])
        else:
            write_video(FLAGS.output_file, frames, fps=VIDEO_FPS)
        print(f"wrote {FLAGS.output_file} ({FLAGS.n_frames} frame{'s' if FLAGS.n_frames > 1 else ''})", flush=True)


def generate_list_main() -> None:
    """List mode: every job of --prompts_file without a line in <output_dir>/generated.jsonl."""
    from lwm.jobs import ResultWriter, read_jobs

    if not FLAGS.output_dir:
        raise app.UsageError("--prompts_file needs --output_dir (where <id>.png / <id>.mp4 go)")
    if FLAGS.batch_size < 1:
        raise app.UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if not FLAGS.vqgan_checkpoint:
        raise app.UsageError("--vqgan_checkpoint is required: the pickled params of the VQGAN image tokenizer")
    cli.check_input_files([("--prompts_file", FLAGS.prompts_file), ("--vqgan_checkpoint", FLAGS.vqgan_checkpoint),
                           ("--vqgan_config", vqgan_config_file(FLAGS.vqgan_config))])
    jobs = read_jobs(FLAGS.prompts_file, ("id", "prompt"))
    for job in jobs:
        job["n_frames"] = int(job.get("n_frames", 1))
        if job["n_frames"] < 1:
            raise app.UsageError(f"--prompts_file: id {job['id']}: n_frames must be >= 1, got {job['n_frames']}")
    check_model_files(FLAGS)
    JaxDistributedConfig.initialize(FLAGS.jax_distributed)
    vqgan = VQGAN(FLAGS.vqgan_checkpoint, VQGANConfig.from_json(FLAGS.vqgan_config))
    generator = VisionGenerator(load_model_from_flags(FLAGS, vision=True), vqgan)
    with ResultWriter(os.path.join(FLAGS.output_dir, "generated.jsonl")) as out:
        todo = [j for j in jobs if j["id"] not in out.done]
        for n_frames, cfg_scale in sorted({(j["n_frames"], j.get("cfg_scale")) for j in todo}, key=str):
            group = [j for j in todo if j["n_frames"] == n_frames and j.get("cfg_scale") == cfg_scale]
            for start in range(0, len(group), FLAGS.batch_size):
                batch = group[start:start + FLAGS.batch_size]
                # by the first prompt's place in the list: the same on every process, and after a resume
                rng = jax.random.fold_in(jax.random.key(FLAGS.seed), jobs.index(batch[0]))
                frames = generate_frames(generator, [j["prompt"] for j in batch], n_frames, rng, cfg_scale)
                for job, clip in zip(batch, frames):
                    path = os.path.join(FLAGS.output_dir, f"{job['id']}.{'png' if n_frames == 1 else 'mp4'}")
                    if jax.process_index() == 0:
                        write_image(path, clip[0]) if n_frames == 1 else write_video(path, clip, fps=VIDEO_FPS)
                        out.write({**job, "output_file": os.path.basename(path)})
    if jax.process_index() == 0:
        print(f"generated: {FLAGS.output_dir} ({len(jobs)} prompts, {len(todo)} generated now)", flush=True)


def generate_frames(generator: VisionGenerator, prompts: list[str], n_frames: int, rng,
                    cfg_scale: float | None = None) -> np.ndarray:
    """uint8 [len(prompts), n_frames, H, W, 3] with the flags' sampling settings (`cfg_scale`, when
    given, for both the image and the video's frames)."""
    image_rng, video_rng = jax.random.split(rng)
    tokens = generator.first_frames(prompts, image_rng, FLAGS.temperature_image, FLAGS.top_k_image,
                                    FLAGS.cfg_scale_image if cfg_scale is None else float(cfg_scale))
    if n_frames > 1:
        tokens = generator.continue_video(prompts, tokens, n_frames, video_rng, FLAGS.temperature_video,
                                          FLAGS.top_k_video, FLAGS.cfg_scale_video if cfg_scale is None
                                          else float(cfg_scale))
    return generator.decode(tokens)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cli.run(main)
