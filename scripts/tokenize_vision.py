"""Turn images and videos with captions into LWM `json_vision` training data (VQGAN codes).

    python scripts/tokenize_vision.py --input=/data/clips --output=/data/train.jsonl \\
        --vqgan_checkpoint=/ckpt/vqgan.pkl --mode=both --max_n_frames=8 --batch_size=32

Input: a folder (searched recursively; each image/video needs a caption file next to it with
the same stem, `cat.png` + `cat.txt`) or a JSONL file of {"path": ..., "caption": ...}
(optional "id"; relative paths are relative to the JSONL's folder). A JSONL line's other keys
are copied to its output line, and its own "fields" replaces the mode's: questions and answers
(`"fields": "[prompt],[vision],[cue],answer"` with those text keys) go through unchanged
(scripts/make_synthetic_vision.py writes such lists).

Output: one JSON line per input, e.g.
    {"id": "cat.png", "path": "cat.png", "caption": "a cat", "n_frames": 1,
     "vision": [256 codes per frame, frame after frame], "fields": "[<|bos|>],[vision],caption"}
Train on it with `--train_dataset.type=json_vision
--train_dataset.vision_text_processor.fields_from_example=fields`; the loader adds the
<vision> ... </vision> markers and the 8192 / 8193 end-of-frame / end-of-vision tokens.
Field specs (a field in [...] has no loss):
    understanding  [<|bos|>],[vision],caption   (see the frames, learn to caption)
    generation     [<|bos|>],[caption],vision   (read the caption, learn to draw)
    both           a list of the two; the loader picks one per line, seeded by line number.

Re-running skips inputs already in the output (by id), so an interrupted run resumes. Lines
are appended and fsync'ed per batch; a torn last line from a crash is cut off on resume.
Inputs that cannot be read are counted, listed at the end and written to
`<output>.failures.jsonl` (they are retried on the next run); `--strict` makes them exit 1.

Every path may be a bucket URL (gs://bucket/clips/, gs://bucket/train.jsonl, through
`lwm.storage`). Media in a bucket are copied to a local temp file to be decoded. A bucket
object cannot be appended to, so an output in a bucket is uploaded whole after every batch:
for a large data set, write the output locally and copy it up at the end.
See docs/vision_data.md.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from lwm import cli, storage
from lwm.vision_io import IMAGE_SUFFIXES, VIDEO_BACKENDS, read_vision
from lwm.vqgan import VQGAN, VQGANConfig, vqgan_config_file

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
MODES = ("understanding", "generation", "both")
END_OF_FRAME = 8192  # the loader's eof token: VQGAN codes must stay below it


def field_specs(mode: str, caption_key: str = "caption", vision_key: str = "vision") -> str | list[str]:
    """The `fields` value written on every line for a mode."""
    understanding = f"[<|bos|>],[{vision_key}],{caption_key}"
    generation = f"[<|bos|>],[{caption_key}],{vision_key}"
    if mode == "understanding":
        return understanding
    if mode == "generation":
        return generation
    if mode == "both":
        return [understanding, generation]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class Item:
    id: str  # unique key in the output, used to resume
    path: str  # as the input gave it
    file: str  # resolved path to read
    caption: str
    extra: dict = dataclasses.field(default_factory=dict)  # a JSONL line's other keys, copied to the output


@dataclasses.dataclass
class Report:
    written: int = 0  # examples written by this run
    frames: int = 0  # frames encoded by this run
    already_done: int = 0  # inputs skipped because the output had them
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason)


# ----------------------------------------------------------------------------- listing inputs


def _is_media(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES


def list_folder(folder: str, caption_suffix: str = ".txt") -> tuple[list[Item], list[tuple[str, str]]]:
    """Media files under folder (sorted, recursive) with their caption files; missing captions are failures."""
    items, failures = [], []
    for root, dirs, files in _walk(folder, caption_suffix):
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            if not _is_media(name):
                continue
            file = storage.join(root, name)
            rel = _relative(file, folder)
            caption_file = os.path.splitext(file)[0] + caption_suffix
            if os.path.splitext(name)[0] + caption_suffix not in names:  # the listing says; no request per file
                failures.append((rel, f"no caption file {_relative(caption_file, folder)}"))
                continue
            items.append(Item(rel, rel, file, storage.read_text(caption_file).strip()))
    return items, failures


def _walk(folder: str, caption_suffix: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(folder)`, or the same (root, dirs, files) top-down for a bucket prefix, where a
    name is a folder when objects lie under it (asked only of names that are not media or captions)."""
    if not storage.is_remote(folder):
        yield from os.walk(folder)
        return
    dirs, files = [], []
    for name in storage.listdir(folder):
        plain = _is_media(name) or name.endswith(caption_suffix)
        (files if plain or not storage.isdir(storage.join(folder, name)) else dirs).append(name)
    yield folder, dirs, files  # the caller may sort or prune dirs, as with os.walk
    for name in dirs:
        yield from _walk(storage.join(folder, name), caption_suffix)


def _relative(path: str, folder: str) -> str:
    if storage.is_remote(folder):
        return path[len(folder.rstrip("/")) + 1:]
    return os.path.relpath(path, folder).replace(os.sep, "/")


def list_jsonl(path: str, path_key: str = "path", caption_key: str = "caption",
               id_key: str = "id") -> tuple[list[Item], list[tuple[str, str]]]:
    """Items of a JSONL list; malformed lines are failures (named by line number)."""
    base = storage.dirname(path) if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))
    items, failures = [], []
    with storage.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                failures.append((where, f"malformed JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(record, dict) or not isinstance(record.get(path_key), str) \
                    or not isinstance(record.get(caption_key), str):
                failures.append((where, f"expected an object with string fields {path_key!r} and {caption_key!r}"))
                continue
            media = record[path_key]
            item_id = str(record[id_key]) if id_key in record else media
            file = media if storage.is_remote(media) else storage.join(base, media)
            extra = {k: v for k, v in record.items() if k not in (path_key, caption_key, id_key)}
            codes_like = sorted(k for k in extra if "vision" in k)
            if codes_like:
                failures.append((where, f"key(s) {codes_like} would be read as VQGAN codes by the loader (a key "
                                        "holding 'vision' is a code field); rename them"))
                continue
            items.append(Item(item_id, media, file, record[caption_key], extra))
    return items, failures


def check_unique_ids(items: list[Item], id_key: str = "id") -> None:
    counts = collections.Counter(item.id for item in items)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"{len(duplicates)} ids occur more than once, e.g. {duplicates[:5]}; an id names one "
                         f"output line (for resuming). Give repeated media an explicit {id_key!r} per line.")


# ----------------------------------------------------------------------------- the output file


def completed_ids(output: str) -> set[str]:
    """Ids already in the output. A torn last line (a crash mid-write) is cut off; a bad line
    elsewhere means the file is not ours to append to, and is an error."""
    if not storage.exists(output):
        return set()
    done = set()
    data = storage.read_bytes(output)
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline ('' when clean)
    keep_bytes = len(data) - len(tail)
    for line_no, line in enumerate(complete, start=1):
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            if line_no == len(complete) and not tail:
                keep_bytes -= len(line) + 1  # the last line itself was torn before its newline was fsynced
                break
            raise ValueError(f"{output}:{line_no}: not a json_vision line with an 'id' ({type(e).__name__}); "
                             f"refusing to append to it") from e
    if keep_bytes < len(data):
        print(f"{output}: cutting off an incomplete last line ({len(data) - keep_bytes} bytes) from an "
              f"interrupted run", file=sys.stderr)
        if storage.is_remote(output):
            storage.write_bytes(output, data[:keep_bytes])
        else:
            with open(output, "r+b") as f:
                f.truncate(keep_bytes)
                os.fsync(f.fileno())
    return done


@contextlib.contextmanager
def _appender(output: str) -> Iterator[Callable[[str], None]]:
    """`append(text)`: durable once it returns. A local file is appended to and fsync'ed; a bucket
    object, which cannot be appended to, is uploaded whole again (atomically) each time."""
    if not storage.is_remote(output):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "a", encoding="utf-8") as out:
            def append(text: str) -> None:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            yield append
        return
    content = bytearray(storage.read_bytes(output) if storage.exists(output) else b"")

    def upload(text: str) -> None:
        content.extend(text.encode("utf-8"))
        storage.write_bytes(output, bytes(content))
    yield upload


def _write_atomic_jsonl(path: str, records: Iterable[dict]) -> None:
    storage.write_text(path, "".join(json.dumps(record) + "\n" for record in records))


# ----------------------------------------------------------------------------- the pipeline


def check_options(mode: str, caption_key: str, vision_key: str, batch_size: int, num_workers: int):
    """The options' errors (named as the flags), before anything is read or written; returns the fields."""
    if "vision" not in vision_key:
        raise ValueError(f"--vision_key={vision_key!r} must contain 'vision' (the loader finds code fields by that)")
    if "vision" in caption_key:
        raise ValueError(f"--caption_key={caption_key!r} must not contain 'vision' (the loader would read it as "
                         "codes)")
    for flag, key in (("--caption_key", caption_key), ("--vision_key", vision_key)):
        if any(ch in key for ch in ",+[]"):
            raise ValueError(f"{flag}={key!r} may not contain ',', '+', '[' or ']' (field-spec syntax)")
    if batch_size < 1 or num_workers < 1:
        raise ValueError(f"--batch_size and --num_workers must be >= 1, got {batch_size} and {num_workers}")
    return field_specs(mode, caption_key, vision_key)


def tokenize_vision(items: list[Item], output: str, vqgan: VQGAN, *, mode: str = "understanding",
                    max_n_frames: int = 8, batch_size: int = 16, caption_key: str = "caption",
                    vision_key: str = "vision", video_backend: str = "auto", num_workers: int = 2,
                    progress: bool = True, report: Report | None = None) -> Report:
    """Encode every item not yet in `output` and append its json_vision line.

    Frames are read by `num_workers` threads (a bounded look-ahead), gathered until a batch
    holds >= batch_size frames, encoded in one VQGAN call and written (then fsync'ed).
    """
    fields = check_options(mode, caption_key, vision_key, batch_size, num_workers)
    if vqgan.config.num_embeddings > END_OF_FRAME:
        raise ValueError(f"the VQGAN has {vqgan.config.num_embeddings} codes; json_vision needs codes below "
                         f"the end-of-frame token {END_OF_FRAME}")
    report = report or Report()
    check_unique_ids(items)
    done = completed_ids(output)
    todo = [item for item in items if item.id not in done]
    report.already_done += len(items) - len(todo)
    size = vqgan.config.resolution

    def read(item: Item) -> np.ndarray:
        return read_vision(item.file, max_n_frames=max_n_frames, size=size, backend=video_backend)

    bar = tqdm(total=len(todo), desc="tokenize_vision", unit="input", disable=not progress)
    pending: list[tuple[Item, np.ndarray]] = []

    def flush(append) -> None:
        if not pending:
            return
        frames = np.concatenate([f for _, f in pending])  # [sum k, size, size, 3]
        codes = np.asarray(vqgan.encode(frames, progress=False)[1])  # [sum k, h, w]
        start, lines = 0, []
        for item, item_frames in pending:
            k = len(item_frames)
            record = {**item.extra, "id": item.id, "path": item.path, caption_key: item.caption, "n_frames": k,
                      vision_key: codes[start:start + k].reshape(-1).tolist(),
                      "fields": item.extra.get("fields", fields)}
            lines.append(json.dumps(record) + "\n")
            start += k
        append("".join(lines))
        report.written += len(pending)
        report.frames += start
        bar.update(len(pending))
        pending.clear()

    with _appender(output) as out, \
            concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
        queue: collections.deque = collections.deque()
        remaining = iter(todo)
        look_ahead = 2 * num_workers
        while True:
            while len(queue) < look_ahead:
                item = next(remaining, None)
                if item is None:
                    break
                queue.append((item, pool.submit(read, item)))
            if not queue:
                break
            item, future = queue.popleft()
            try:
                frames = future.result()
            except Exception as e:  # noqa: BLE001 (reported per file, never silently skipped)
                report.failures.append((item.path, f"{type(e).__name__}: {e}"))
                bar.update(1)
                bar.set_postfix(failed=len(report.failures))
                continue
            pending.append((item, frames))
            if sum(len(f) for _, f in pending) >= batch_size:
                flush(out)
        flush(out)
    bar.close()
    return report


def write_failures(output: str, failures: list[tuple[str, str]]) -> str:
    """`<output>.failures.jsonl` lists this run's failures; removed when there were none."""
    path = output + ".failures.jsonl"
    if failures:
        _write_atomic_jsonl(path, ({"path": p, "error": reason} for p, reason in failures))
    elif storage.exists(path):
        storage.remove(path)
    return path


# ----------------------------------------------------------------------------- command line


def _define(kind, name, default, *args):
    if name not in flags.FLAGS:  # importing this module twice (tests) must not redefine flags
        kind(name, default, *args)


_define(flags.DEFINE_string, "input", "", "folder of images/videos with <stem>.txt captions, or a JSONL of "
        '{"path": ..., "caption": ...} lines')
_define(flags.DEFINE_string, "output", "", "JSONL to write (appended to; existing ids are skipped)")
_define(flags.DEFINE_string, "vqgan_checkpoint", "", "pickle of the VQGAN params (LWM's vqgan checkpoint)")
_define(flags.DEFINE_string, "vqgan_config", "", "VQGANConfig as a JSON file or JSON object string; '' = LWM's")
_define(flags.DEFINE_integer, "max_n_frames", 8, "frames per video, picked uniformly; <= 0 keeps every frame")
_define(flags.DEFINE_integer, "batch_size", 16, "frames per VQGAN call")
_define(flags.DEFINE_enum, "mode", "understanding", list(MODES), "which field spec(s) each line gets")
_define(flags.DEFINE_string, "path_key", "path", "JSONL input: key of the media path")
_define(flags.DEFINE_string, "caption_key", "caption", "caption key, in the input JSONL and in the output")
_define(flags.DEFINE_string, "id_key", "id", "JSONL input: optional key of a unique id (default: the path)")
_define(flags.DEFINE_string, "vision_key", "vision", "output key of the codes (must contain 'vision')")
_define(flags.DEFINE_string, "caption_suffix", ".txt", "folder input: caption file = media stem + this suffix")
_define(flags.DEFINE_enum, "video_backend", "auto", list(VIDEO_BACKENDS), "video reader")
_define(flags.DEFINE_integer, "num_workers", 2, "threads reading and resizing media")
_define(flags.DEFINE_bool, "shard_over_devices", False, "spread each VQGAN batch over all local devices")
_define(flags.DEFINE_bool, "strict", False, "exit with status 1 when any input failed")
_define(flags.DEFINE_bool, "progress", True, "show a progress bar")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not (FLAGS.input and FLAGS.output and FLAGS.vqgan_checkpoint):
        raise app.UsageError("--input, --output and --vqgan_checkpoint are required")
    check_options(FLAGS.mode, FLAGS.caption_key, FLAGS.vision_key, FLAGS.batch_size, FLAGS.num_workers)
    if not storage.exists(FLAGS.input):
        raise app.UsageError(f"--input={FLAGS.input}: no such file or folder")
    cli.check_input_files([("--vqgan_checkpoint", FLAGS.vqgan_checkpoint),
                           ("--vqgan_config", vqgan_config_file(FLAGS.vqgan_config))])
    cli.check_output_file("--output", FLAGS.output)
    if storage.isdir(FLAGS.input):
        items, failures = list_folder(FLAGS.input, FLAGS.caption_suffix)
    else:
        items, failures = list_jsonl(FLAGS.input, FLAGS.path_key, FLAGS.caption_key, FLAGS.id_key)
    config = VQGANConfig.from_json(FLAGS.vqgan_config)
    mesh = None
    if FLAGS.shard_over_devices:
        import jax

        devices = np.array(jax.local_devices()).reshape(1, -1, 1, 1)
        mesh = jax.sharding.Mesh(devices, ("dp", "fsdp", "tp", "sp"))
    vqgan = VQGAN(FLAGS.vqgan_checkpoint, config, frames_per_chunk=FLAGS.batch_size, mesh=mesh)
    if config.tokens_per_frame != 256:
        print(f"note: this VQGAN gives {config.tokens_per_frame} codes per frame; train with "
              f"--train_dataset.vision_text_processor.n_tokens_per_frame={config.tokens_per_frame}", file=sys.stderr)
    report = Report(failures=list(failures))
    tokenize_vision(items, FLAGS.output, vqgan, mode=FLAGS.mode, max_n_frames=FLAGS.max_n_frames,
                    batch_size=FLAGS.batch_size, caption_key=FLAGS.caption_key, vision_key=FLAGS.vision_key,
                    video_backend=FLAGS.video_backend, num_workers=FLAGS.num_workers, progress=FLAGS.progress,
                    report=report)
    failures_file = write_failures(FLAGS.output, report.failures)
    print(f"wrote {report.written} examples ({report.frames} frames) to {FLAGS.output}; "
          f"{report.already_done} were already there; {len(report.failures)} inputs failed")
    for path, reason in report.failures:
        print(f"  FAILED {path}: {reason}")
    if report.failures:
        print(f"failures listed in {failures_file}; re-run to retry them")
        if FLAGS.strict:
            sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
