"""Needle-in-a-haystack evals (docs/needle.md), single- and multi-needle, and their plots.

One implementation serves `scripts/eval_needle.py` and `scripts/eval_needle_multi.py`; they
differ only in how needles are placed and asked:

* single: for every (context length, depth, round) one needle
  `\\nThe special magic {city} number is: {number}\\n` goes at the last sentence break ('.')
  before `depth`% of the haystack; the question is `What is the special magic {city} number?`.
* multi: for every (context length, round) N needles at N distinct depths drawn from the depth
  grid; R of them are asked (`What are the special magic numbers for A, B, and C?`), scored
  per needle.

The haystack is the text of consecutive lines of a JSONL file (`{"text": ...}` a line), one
stretch per round, tokenized by the model's own tokenizer and cut to the context length; 200
tokens of that budget are left for the prompt and the answer. Prompts are batched by
`max_tokens_per_batch`, padded to the mesh's data dimension, decoded greedily, and scored
twice: `correct`, the original's (the response contains the number), and `correct_strict`
(the response's first numbers are the needles, see `score_strict`); summaries and plots use
the strict score unless told otherwise. Results are appended to `output_file` (a
JSON list, rewritten atomically after every batch) and cases already there are skipped on a
restart. Each case's city and number come from a generator seeded by (seed, case), so a
resumed run asks exactly what a fresh run would. The haystack, the results and the heatmap
may be in a bucket (`gs://...`, through `lwm.storage`): the list is then uploaded whole after
every batch.

    settings = NeedleSettings(haystack_file="pg19.jsonl", output_file="results.json",
                              context_lengths_min=1000, context_lengths_max=32000)
    results = run_needle_eval(settings, load_model(...))
    plot_needle_results(results, "results.png")
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import os
import random
import re
from collections import defaultdict
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from lwm import storage

log = logging.getLogger(__name__)

NEEDLE = "\nThe special magic {city} number is: {number}\n"
QUESTION = "What is the special magic {city} number?"
MULTI_QUESTION = "What are the special magic numbers for {cities}?"
MULTI_QUESTION_ONE = "What is the special magic number for {city}?"
PROMPT = ("You are a helpful assistant. USER: {context} {question} Don't give information outside the document "
          "or repeat your findings. Keep your response short and direct. ASSISTANT: ")
# The original multi-needle eval used this shorter instruction; kept so its numbers reproduce.
MULTI_PROMPT = ("You are a helpful assistant. USER: {context} {question} Don't give information outside the document. "
                "ASSISTANT: ")
FINAL_CONTEXT_BUFFER = 200  # tokens of the context length left for the prompt text and the answer
NUMBER_DIGITS = 7
# The original's city list, duplicates removed (a duplicate would let two needles share a name).
CITIES = tuple(dict.fromkeys([
    "Chicago", "Yangon", "Antananarivo", "Colombo", "Almaty", "Sydney", "Mexico City", "Seattle", "Lagos",
    "Amsterdam", "Belgrade", "Cairo", "Baghdad", "Damascus", "Kigali", "Dakar", "Sofia", "Victoria", "Tashkent",
    "Mumbai", "Barcelona", "Amman", "Toronto", "Bratislava", "Johannesburg", "Thimphu", "Bangkok", "Santiago",
    "San Francisco", "Paris", "Rabat", "Copenhagen", "Madrid", "Ho Chi Minh City", "Sarajevo", "Delhi",
    "Istanbul", "Khartoum", "Helsinki", "Doha", "Kuala Lumpur", "Budapest", "Shanghai", "Moscow", "Los Angeles",
    "Oslo", "Berlin", "Bangalore", "Tokyo", "Melbourne", "Port Louis", "Lisbon", "Nairobi", "Kampala", "Lima",
    "Maputo", "Vancouver", "Dubai", "Jakarta", "Yerevan", "Beirut", "Athens", "Bucharest", "Brussels", "Tunis",
    "Astana", "Seoul", "Buenos Aires", "Vienna",
]))


@dataclasses.dataclass(frozen=True)
class NeedleSettings:
    """One eval run (the scripts' flags of the same names)."""

    haystack_file: str  # JSONL, one {"text": ...} a line
    output_file: str = "results.json"  # JSON list of results; existing results are resumed
    max_tokens_per_batch: int = 2000000  # prompt + generation tokens per batch (sets the batch size)
    context_lengths_min: int = 1000
    context_lengths_max: int = 32000
    n_context_length_intervals: int = 3
    n_document_depth_intervals: int = 3
    n_rounds: int = 2  # haystack stretches (and needles) per grid point
    seed: int = 1234
    multi: bool = False  # multi-needle eval
    n_needles_total: int = 4  # multi only: needles inserted
    n_needles_retrieve: int = 4  # multi only: needles asked for
    max_new_tokens: int = 0  # 0: the attention block size, as the original
    prompt_buffer_tokens: int = FINAL_CONTEXT_BUFFER  # context tokens kept for the prompt text and answer
    needle_placement: str = "period"  # after the last lone period before the depth, or any `sentence_end`
    checkpoint: dict | None = None  # lwm.checkpoint.checkpoint_identity of the weights scored, written with each result

    def __post_init__(self):
        if self.needle_placement not in PLACEMENTS:
            raise ValueError(f"--needle_placement={self.needle_placement!r}; expected one of {', '.join(PLACEMENTS)}")
        if not self.haystack_file:
            raise ValueError("--haystack_file is required (a JSONL of {\"text\": ...}; scripts/create_needle_data.py "
                             "writes one)")
        if not 0 < self.context_lengths_min <= self.context_lengths_max:
            raise ValueError(f"need 0 < --context_lengths_min <= --context_lengths_max, got {self.context_lengths_min} "
                             f"and {self.context_lengths_max}")
        for name in ("n_context_length_intervals", "n_document_depth_intervals", "n_rounds", "max_tokens_per_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.prompt_buffer_tokens < 0:
            raise ValueError(f"--prompt_buffer_tokens must be >= 0, got {self.prompt_buffer_tokens}")
        if self.context_lengths_min <= self.prompt_buffer_tokens:
            raise ValueError(f"--context_lengths_min={self.context_lengths_min} leaves no haystack: it must exceed "
                             f"--prompt_buffer_tokens={self.prompt_buffer_tokens} kept for the prompt and answer")
        if self.multi:
            if not 0 < self.n_needles_retrieve <= self.n_needles_total:
                raise ValueError(f"need 0 < --n_needles_retrieve <= --n_needles_total, got {self.n_needles_retrieve} "
                                 f"and {self.n_needles_total}")
            if self.n_needles_total > self.n_document_depth_intervals:
                raise ValueError(f"--n_needles_total={self.n_needles_total} needles need as many distinct depths, but "
                                 f"--n_document_depth_intervals={self.n_document_depth_intervals}")
            if self.n_needles_total > len(CITIES):
                raise ValueError(f"--n_needles_total={self.n_needles_total} exceeds the {len(CITIES)} needle cities")

    @property
    def context_lengths(self) -> list[int]:
        """Linearly spaced, rounded to integers (np.linspace, endpoints included)."""
        grid = np.linspace(self.context_lengths_min, self.context_lengths_max, self.n_context_length_intervals)
        return [int(x) for x in np.round(grid)]

    @property
    def depth_percents(self) -> list[float]:
        """Linearly spaced over 0..100, rounded to whole percents."""
        return [float(x) for x in np.round(np.linspace(0, 100, self.n_document_depth_intervals))]


# ---- haystack --------------------------------------------------------------------------------


def haystack_texts(path: str) -> Iterator[tuple[int, str]]:
    """Yield (pass, text) for the non-empty `text` of each JSONL line, restarting at the end of
    the file (pass 1, 2, ...), without holding the file in memory (PG-19 is ~11 GB)."""
    for pass_index in itertools.count():
        found = False
        with storage.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
            for line_no in itertools.count(1):
                with storage.translate_errors(path):  # a bucket's read errors as one line naming it
                    line = f.readline()
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}, line {line_no}: expected an object with a string field 'text', got "
                                     f"{line.strip()[:80]!r}")
                if record["text"].strip():
                    found = True
                    yield pass_index, record["text"]
        if not found:
            raise ValueError(f"{path}: no text lines (expected one {{\"text\": ...}} object a line)")


def read_haystacks(path: str, tokenizer, n_rounds: int, n_tokens: int) -> list[list[int]]:
    """`n_rounds` token lists of >= n_tokens each, from consecutive lines of a JSONL file.

    Round i continues where round i-1 stopped; the file wraps around (with a warning) when it
    runs out, and is an error when all of it holds fewer than n_tokens. Lines are joined with
    a space.
    """
    texts = haystack_texts(path)
    rounds, wrapped = [], False
    for _ in range(n_rounds):
        tokens: list[int] = []
        first_pass = None
        while len(tokens) < n_tokens:
            pass_index, text = next(texts)
            first_pass = pass_index if first_pass is None else first_pass
            if pass_index >= first_pass + 2:  # read the whole file once within this round: it is too short
                raise ValueError(f"{path}: all its lines hold fewer than the {n_tokens} tokens of "
                                 f"context_lengths_max ({len(tokens)} tokens read)")
            wrapped |= pass_index > 0
            tokens.extend(tokenizer.encode(("" if not tokens else " ") + text))
        rounds.append(tokens)
    if wrapped:
        log.warning("%s has too little text for %d rounds of %d tokens: rounds reuse text from the start",
                    path, n_rounds, n_tokens)
    return rounds


PLACEMENTS = ("period", "sentence_end")  # the original's rule | any sentence end ('.', '?', '!', '."', ...)
SENTENCE_END = re.compile(r"^[^\w\s]*[.!?][\"'\u201d\u2019)\]]*$")  # punctuation only, ending a sentence


def break_token_ids(tokenizer, placement: str = "period") -> frozenset[int]:
    """Ids after which a needle may go: lone periods (`period`, the original's rule) or every
    piece of punctuation that ends a sentence (`sentence_end`: '.', '?', '!', '."', '?)', ...)."""
    if placement == "period":
        return period_token_ids(tokenizer)
    if placement != "sentence_end":
        raise ValueError(f"needle placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    sp = tokenizer.sp
    ids = {i for i in range(sp.get_piece_size())
           if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
           and SENTENCE_END.match(sp.id_to_piece(i).lstrip("\u2581"))}
    return frozenset(ids | period_token_ids(tokenizer))


def period_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the pieces that are a lone period ('.' and '▁.' in LLaMA's vocabulary)."""
    ids = set()
    for piece in (".", "\u2581."):
        i = tokenizer.sp.piece_to_id(piece)
        if i != tokenizer.unk_token_id:
            ids.add(i)
    if not ids:
        raise ValueError(f"{tokenizer}: no '.' piece in the vocabulary; cannot find sentence breaks")
    return frozenset(ids)


def sentence_break_at_or_before(tokens: Sequence[int], position: int, period_ids: Iterable[int]) -> int:
    """The largest p <= position with tokens[p-1] a period (0 when there is none)."""
    period_ids = set(period_ids)
    while position > 0 and tokens[position - 1] not in period_ids:
        position -= 1
    return position


def insert_needles(haystack: Sequence[int], needles: Sequence[tuple[Sequence[int], float]], context_length: int,
                   period_ids: Iterable[int], buffer: int = FINAL_CONTEXT_BUFFER) -> list[int]:
    """Haystack tokens with each (needle tokens, depth %) inserted (`place_needles` without the depths)."""
    return place_needles(haystack, needles, context_length, period_ids, buffer)[0]


def place_needles(haystack: Sequence[int], needles: Sequence[tuple[Sequence[int], float]], context_length: int,
                  period_ids: Iterable[int], buffer: int = FINAL_CONTEXT_BUFFER) -> tuple[list[int], list[float]]:
    """(tokens, actual depths): the haystack with each (needle tokens, depth %) inserted, total
    <= context_length - buffer, and where each needle went, in percent of the (cut) haystack.

    The haystack is first cut so the needles fit the budget; a needle at depth 100 goes at the
    end, any other at the last sentence break before depth% of the (cut) haystack. All needles
    are placed against the same haystack, so no needle is cut off by a later insertion.
    Worked example (period id 9; budget 10 - 2 = 8; needle [7, 7]):
        insert_needles([1, 9, 2, 3, 9, 4, 5, 6], [([7, 7], 50)], 10, {9}, buffer=2)
        -> haystack cut to [1, 9, 2, 3, 9, 4]; 50% = position 3; last break before it at 2
        -> [1, 9, 7, 7, 2, 3, 9, 4], actual depth 2/6 = 33.3%
    """
    budget = context_length - buffer
    needle_total = sum(len(n) for n, _ in needles)
    if budget - needle_total <= 0:
        raise ValueError(f"context length {context_length} minus the {buffer}-token buffer cannot hold the "
                         f"needles ({needle_total} tokens)")
    hay = list(haystack[:budget - needle_total])
    placed = []
    for order, (needle, depth) in enumerate(needles):
        if not 0 <= depth <= 100:
            raise ValueError(f"needle depth {depth} is outside 0..100 percent")
        if depth >= 100:
            at = len(hay)
        else:
            at = sentence_break_at_or_before(hay, int(len(hay) * depth / 100), period_ids)
        placed.append((at, order, list(needle)))
    out, last = [], 0
    for at, _, needle in sorted(placed):
        out += hay[last:at] + needle
        last = at
    return out + hay[last:], [round(100 * at / max(len(hay), 1), 1) for at, _, _ in placed]


# ---- cases -----------------------------------------------------------------------------------


@dataclasses.dataclass
class NeedleCase:
    key: tuple  # identifies the case in the results file (resume)
    prompt: str
    answers: list[str]  # numbers that must appear in the response
    record: dict  # fields written with the result


def random_number(rng: random.Random) -> str:
    return str(rng.randint(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS - 1))


def result_key(result: dict, multi: bool) -> tuple:
    """Resume key: (context length, depth, round) or, multi, (context length, round, N, R)."""
    if multi:
        return (int(result["context_length"]), int(result["seed"]), int(result["n_needles_total"]),
                int(result["n_needles_retrieve"]))
    return int(result["context_length"]), float(result["depth_percent"]), int(result["seed"])


def single_case(tokenizer, haystack: Sequence[int], context_length: int, depth: float, round_index: int,
                seed: int, period_ids, buffer: int = FINAL_CONTEXT_BUFFER) -> NeedleCase:
    rng = random.Random(f"needle:{seed}:{context_length}:{depth}:{round_index}")
    city, number = rng.choice(CITIES), random_number(rng)
    needle = NEEDLE.format(city=city, number=number)
    tokens, (actual,) = place_needles(haystack[:context_length], [(tokenizer.encode(needle), depth)], context_length,
                                      period_ids, buffer)
    question = QUESTION.format(city=city)
    prompt = PROMPT.format(context=tokenizer.decode(tokens), question=question)
    record = dict(context_length=int(context_length), depth_percent=float(depth), actual_depth_percent=actual,
                  needle=needle, question=question, answer=number, seed=int(round_index))
    return NeedleCase((int(context_length), float(depth), int(round_index)), prompt, [number], record)


def multi_question(asked: Sequence[str]) -> str:
    """The multi-needle eval's question for these cities (the original's wording and commas)."""
    if len(asked) == 1:
        return MULTI_QUESTION_ONE.format(city=asked[0])
    return MULTI_QUESTION.format(cities=", ".join(asked[:-1]) + ", and " + asked[-1])


def multi_case(tokenizer, haystack: Sequence[int], context_length: int, round_index: int, settings: NeedleSettings,
               period_ids) -> NeedleCase:
    n, r = settings.n_needles_total, settings.n_needles_retrieve
    rng = random.Random(f"multi:{settings.seed}:{context_length}:{round_index}:{n}:{r}")
    cities = rng.sample(CITIES, n)
    depths = rng.sample(settings.depth_percents, n)
    asked = rng.sample(cities, r)
    info = {c: (random_number(rng), d) for c, d in zip(cities, depths)}
    needles = [(tokenizer.encode(NEEDLE.format(city=c, number=info[c][0])), info[c][1]) for c in cities]
    tokens, actual = place_needles(haystack[:context_length], needles, context_length, period_ids,
                                   settings.prompt_buffer_tokens)
    question = multi_question(asked)
    prompt = MULTI_PROMPT.format(context=tokenizer.decode(tokens), question=question)
    answers = [info[c][0] for c in asked]
    record = dict(context_length=int(context_length), needles_info={c: list(v) for c, v in info.items()},
                  actual_depth_percent=dict(zip(cities, actual)),
                  question=question, cities_to_retrieve=asked, answer=answers, seed=int(round_index),
                  n_needles_total=n, n_needles_retrieve=r)
    return NeedleCase((int(context_length), int(round_index), n, r), prompt, answers, record)


def score(response: str, answers: Sequence[str]) -> list[bool]:
    """Per answer: does the response contain it? (The original's score, kept for comparability:
    it also counts '12345678' for 1234567 and a list of every number in the haystack.)"""
    return [a in response for a in answers]


# A number: a maximal run of digits, or digits grouped in threes by commas ('1,234,567').
# Anything else separates numbers: '1111111, 2222222' and '1111111,22' are two numbers each.
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


def numbers_in(response: str) -> list[int]:
    """The numbers of a response in order: 'is 1,234,567 (or 89)' -> [1234567, 89]."""
    return [int(m.replace(",", "")) for m in NUMBER.findall(response)]


def score_strict(response: str, answers: Sequence[str]) -> list[bool]:
    """Per answer: is it among the response's first len(answers) numbers (compared as whole
    numbers)? One needle asked: the first number must be it; R asked: each counts when it is
    among the first R numbers, so listing every number of the haystack does not score."""
    first = numbers_in(response)[:len(answers)]
    return [int(a) in first for a in answers]


# ---- results file ----------------------------------------------------------------------------


def check_same_checkpoint(results: Sequence[dict], settings: NeedleSettings) -> None:
    """Refuse to add to results scored on other weights (their checkpoint's content hash
    differs): a results file holds one checkpoint's answers. Results without a recorded
    checkpoint (written before results carried one) are kept, with a warning."""
    if settings.checkpoint is None:
        return
    others = {r["checkpoint"]["sha256"] for r in results if "checkpoint" in r} - {settings.checkpoint["sha256"]}
    if others:
        first = next(r["checkpoint"] for r in results if r.get("checkpoint", {}).get("sha256") in others)
        raise ValueError(f"--output_file={settings.output_file}: its results were scored on another checkpoint "
                         f"({first['load_checkpoint']}, sha256 {first['sha256'][:12]}...), not on "
                         f"{settings.checkpoint['load_checkpoint']} (sha256 {settings.checkpoint['sha256'][:12]}...); "
                         "write to a new --output_file, or delete this one to score the new checkpoint")
    unknown = sum("checkpoint" not in r for r in results)
    if unknown:
        log.warning("%s: %d results record no checkpoint; they are kept as this checkpoint's", settings.output_file,
                    unknown)


def placement_deviation(results: Sequence[dict]) -> tuple[float, float] | None:
    """(mean, max) of |actual - labelled| needle depth in percentage points, over every needle of
    results that record where their needles went (None when none does)."""
    gaps = []
    for r in results:
        actual = r.get("actual_depth_percent")
        if isinstance(actual, dict):  # multi: {city: actual} beside needles_info {city: [number, depth]}
            gaps += [abs(actual[c] - float(r["needles_info"][c][1])) for c in actual]
        elif actual is not None:
            gaps.append(abs(actual - float(r["depth_percent"])))
    return (round(float(np.mean(gaps)), 1), round(float(np.max(gaps)), 1)) if gaps else None


def load_results(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    try:
        results = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}; move it away to start over") from None
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a JSON list of results, got {type(results).__name__}")
    return results


def save_results(path: str, results: list[dict]) -> None:
    """Write the JSON list as a whole, atomically (a local temp file then a rename, or one
    object upload): a reader or a resumed run sees the old list or the new one."""
    storage.write_text(path, json.dumps(results, indent=1))


# ---- running ---------------------------------------------------------------------------------


def batch_size_for(max_tokens_per_batch: int, prompt_length: int, block: int, data_dim: int, n_cases: int) -> int:
    """Rows per batch: max_tokens_per_batch / (prompt + block) tokens, a multiple of the data
    dimension, at least one data dimension and no more than the cases need."""
    rows = int(max_tokens_per_batch / (prompt_length + block)) // data_dim * data_dim
    return max(data_dim, min(rows, -(-n_cases // data_dim) * data_dim))


MIN_ANSWER_TOKENS = 16


def answer_budget(requested: int, prompt_tokens: int, config, mesh) -> int:
    """Tokens to generate: `requested`, reduced to what the cache has room for after the
    prompt of `prompt_tokens`, padded (a context length at max_sequence_length leaves less than a block)."""
    from lwm.generation import padded_prompt_length, room_error, room_for_new_tokens

    prompt_length = padded_prompt_length(prompt_tokens, config, mesh)
    room = room_for_new_tokens(prompt_length, config, mesh)
    if room < MIN_ANSWER_TOKENS:
        raise ValueError(room_error(
            "the longest prompt (context, needle and question)", prompt_tokens, MIN_ANSWER_TOKENS, config, mesh,
            fixes="a lower --context_lengths_max (it and --prompt_buffer_tokens leave room for the answer at "
                  "max_sequence_length minus one block; docs/needle.md)"))
    if room < requested:
        log.info("generating %d tokens (not %d): the cache has room for no more after a %d-token prompt",
                 room, requested, prompt_length)
    return min(requested, room)


def run_needle_eval(settings: NeedleSettings, loaded, progress: bool = True, sampler=None) -> list[dict]:
    """Run every case not yet in settings.output_file; returns all results (old and new).

    `sampler` (default: a `Sampler` of the loaded model) is anything with Sampler's
    `generate(ids, mask, rng, sampling)` and `data_dim`, e.g. a scripted model in tests.
    """
    import jax
    from tqdm import tqdm

    from lwm.generation import Sampler, SamplingParams, block_size, padded_prompt_length

    tokenizer, config, mesh = loaded.tokenizer, loaded.config, loaded.mesh
    if sampler is None:
        sampler = Sampler(loaded.model, loaded.params, mesh=mesh)
    block = block_size(config, mesh)
    max_new = settings.max_new_tokens or block
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.eos_token_id)
    results = load_results(settings.output_file)
    check_same_checkpoint(results, settings)
    done = {result_key(r, settings.multi) for r in results}
    if done:
        log.info("%s: %d results already there; skipping those cases", settings.output_file, len(done))
    period_ids = break_token_ids(tokenizer, settings.needle_placement)
    haystacks = read_haystacks(settings.haystack_file, tokenizer, settings.n_rounds, max(settings.context_lengths))
    per_length = {}
    for length in settings.context_lengths:
        if settings.multi:
            cases = [multi_case(tokenizer, haystacks[i], length, i, settings, period_ids)
                     for i in range(settings.n_rounds)]
        else:
            cases = [single_case(tokenizer, haystacks[i], length, depth, i, settings.seed, period_ids,
                                 settings.prompt_buffer_tokens)
                     for depth in settings.depth_percents for i in range(settings.n_rounds)]
        per_length[length] = [c for c in cases if c.key not in done]
    # Every context length's prompts and answer budget first, so a length past
    # max_sequence_length fails before any decoding rather than after hours of it.
    planned = []
    for length, cases in per_length.items():
        if not cases:
            continue
        encoded = [tokenizer.encode(c.prompt, add_bos=True) for c in cases]
        longest = max(len(e) for e in encoded)
        prompt_length = padded_prompt_length(longest, config, mesh)
        budget = answer_budget(max_new, longest, config, mesh)
        planned.append((cases, encoded, prompt_length, dataclasses.replace(greedy, max_new_tokens=budget)))
    write = jax.process_index() == 0
    bar = tqdm(total=sum(len(c) for c in per_length.values()), desc="needle cases", disable=not progress)
    for cases, encoded, prompt_length, sampling in planned:
        rows = batch_size_for(settings.max_tokens_per_batch, prompt_length, block, sampler.data_dim, len(cases))
        for start in range(0, len(cases), rows):
            batch_cases = cases[start:start + rows]
            batch = encoded[start:start + rows]
            batch += [batch[-1]] * (rows - len(batch))  # pad to a full batch; the copies are not recorded
            ids, mask = tokenizer.pad(batch, max_length=prompt_length, truncation_side="left")
            out = sampler.generate(ids, mask, jax.random.key(settings.seed), sampling)
            for case, tokens, n in zip(batch_cases, out.tokens, out.lengths):
                response = tokenizer.decode(tokens[:n])
                correct, strict = score(response, case.answers), score_strict(response, case.answers)
                results.append({**case.record, "response": response,
                                "correct": correct if settings.multi else correct[0],
                                "correct_strict": strict if settings.multi else strict[0],
                                **({"checkpoint": settings.checkpoint} if settings.checkpoint else {})})
            if write:
                save_results(settings.output_file, results)
            bar.update(len(batch_cases))
    bar.close()
    return results


# ---- summaries and plots ---------------------------------------------------------------------


def is_multi(results: Sequence[dict]) -> bool:
    return bool(results) and "needles_info" in results[0]


SCORES = ("strict", "substring")  # `score_strict` (the default in summaries) | `score`, the original's


def result_correct(result: dict, scoring: str = "strict"):
    """A result's correctness (a bool; multi: one per asked needle) under `scoring`.

    'substring' is the stored `correct`. 'strict' is `correct_strict`, recomputed from the
    stored response and answer for results written before it existed; a result with neither
    falls back to `correct` (`summary_table` says how many did).
    """
    if scoring not in SCORES:
        raise ValueError(f"scoring={scoring!r}; expected one of {SCORES}")
    if scoring == "substring":
        return result["correct"]
    if "correct_strict" in result:
        return result["correct_strict"]
    if "response" not in result or "answer" not in result:
        return result["correct"]
    answers = result["answer"]
    strict = score_strict(result["response"], answers if isinstance(answers, list) else [answers])
    return strict if isinstance(answers, list) else strict[0]


def strict_fallbacks(results: Sequence[dict]) -> int:
    """How many results the strict score cannot rescore (no correct_strict, response or answer)."""
    return sum("correct_strict" not in r and ("response" not in r or "answer" not in r) for r in results)


def needle_accuracy(result: dict, scoring: str = "strict") -> float:
    """Fraction of the asked needles found (under `scoring`)."""
    correct = result_correct(result, scoring)
    return float(np.mean(correct)) if isinstance(correct, list) else float(bool(correct))


def accuracy_grid(results: Sequence[dict], scoring: str = "strict") -> tuple[list[int], list[float], np.ndarray]:
    """Single-needle results -> (context lengths, depths, mean accuracy [depth, length]; nan if none)."""
    lengths = sorted({int(r["context_length"]) for r in results})
    depths = sorted({float(r["depth_percent"]) for r in results})
    sums, counts = np.zeros((len(depths), len(lengths))), np.zeros((len(depths), len(lengths)))
    for r in results:
        i, j = depths.index(float(r["depth_percent"])), lengths.index(int(r["context_length"]))
        sums[i, j] += needle_accuracy(r, scoring)
        counts[i, j] += 1
    with np.errstate(invalid="ignore"):
        return lengths, depths, sums / counts


def multi_accuracy_table(results: Sequence[dict], scoring: str = "strict") -> dict[tuple[int, int], dict[int, float]]:
    """Multi-needle results -> {(N, R): {context length: mean per-needle accuracy}}."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        n = int(r.get("n_needles_total", len(r["needles_info"])))
        k = int(r.get("n_needles_retrieve", len(r["correct"])))
        groups[(n, k)][int(r["context_length"])].append(needle_accuracy(r, scoring))
    return {nr: {length: float(np.mean(v)) for length, v in sorted(by_len.items())}
            for nr, by_len in sorted(groups.items())}


MULTI_ERROR_KINDS = ("found", "other_asked", "distractor", "not_a_needle", "missing")


def multi_needle_errors(results: Sequence[dict]) -> dict:
    """What comes back in the slot of each asked needle of multi-needle results (strict reading:
    the response's i-th number answers the i-th asked city):

      found          the asked number is among the first R numbers (the strict score's hit);
      other_asked    the number of the other asked city (said twice, or the pair swapped and half lost);
      distractor     the number of a needle that was not asked;
      not_a_needle   a number no needle holds (digits garbled or invented);
      missing        the response has fewer than i + 1 numbers.

    Returns the fraction of asked needles of each kind, and for the distractor answers the share
    that took the needle nearest in the context to the asked one (`distractor_nearest`) and the
    share placed before it (`distractor_before`): a lookup by position instead of by key
    returns neighbours, a lookup by a partial key any of them."""
    counts = dict.fromkeys(MULTI_ERROR_KINDS, 0)
    nearest = before = 0
    for r in results:
        if "response" not in r or "cities_to_retrieve" not in r:
            continue  # a result without its response cannot say what came back
        info = {c: (int(v[0]), v[1]) for c, v in r["needles_info"].items()}
        depth = {c: float(r.get("actual_depth_percent", {}).get(c, info[c][1])) for c in info}
        asked = list(r["cities_to_retrieve"])
        returned = numbers_in(r.get("response", ""))
        for i, city in enumerate(asked):
            if info[city][0] in returned[:len(asked)]:
                counts["found"] += 1
                continue
            if i >= len(returned):
                counts["missing"] += 1
                continue
            owner = next((c for c, (number, _) in info.items() if number == returned[i]), None)
            if owner is None:
                counts["not_a_needle"] += 1
            elif owner in asked:
                counts["other_asked"] += 1
            else:
                counts["distractor"] += 1
                others = [c for c in info if c != city]
                nearest += owner == min(others, key=lambda c: abs(depth[c] - depth[city]))
                before += depth[owner] < depth[city]
    total = max(sum(counts.values()), 1)
    summary = {kind: round(n / total, 4) for kind, n in counts.items()}
    summary.update(asked=sum(counts.values()),
                   distractor_nearest=round(nearest / counts["distractor"], 4) if counts["distractor"] else None,
                   distractor_before=round(before / counts["distractor"], 4) if counts["distractor"] else None)
    return summary


def multi_errors_line(results: Sequence[dict]) -> str:
    """multi_needle_errors as one line of the eval's summary ('' when no result has its response)."""
    e = multi_needle_errors(results)
    if not e["asked"]:
        return ""
    line = (f"asked needles ({e['asked']}): found {e['found']:.2f}, another asked city's number {e['other_asked']:.2f}, "
            f"an unasked needle's {e['distractor']:.2f}, no needle's {e['not_a_needle']:.2f}, none {e['missing']:.2f}")
    if e["distractor_nearest"] is not None:
        line += (f"; of the unasked needles returned, {e['distractor_nearest']:.2f} the nearest to the asked one, "
                 f"{e['distractor_before']:.2f} before it")
    return line


def summary_table(results: Sequence[dict], scoring: str = "strict") -> str:
    """A markdown table of accuracy (single: depth x context length; multi: (N, R) x context
    length) under `scoring`, with a line naming the score and any results it could not apply to."""
    if not results:
        return "(no results)"
    if is_multi(results):
        table = multi_accuracy_table(results, scoring)
        lengths = sorted({length for by_len in table.values() for length in by_len})
        lines = ["| N, R | " + " | ".join(str(x) for x in lengths) + " | mean |",
                 "|---" * (len(lengths) + 2) + "|"]
        for (n, k), by_len in table.items():
            cells = [f"{by_len[x]:.2f}" if x in by_len else "-" for x in lengths]
            lines.append(f"| {n}, {k} | " + " | ".join(cells) + f" | {np.mean(list(by_len.values())):.2f} |")
        lines += [line for line in [multi_errors_line(results)] if line]
    else:
        lengths, depths, grid = accuracy_grid(results, scoring)
        lines = ["| depth % \\ context | " + " | ".join(str(x) for x in lengths) + " |",
                 "|---" * (len(lengths) + 1) + "|"]
        for depth, row in zip(depths, grid):
            lines.append(f"| {depth:g} | " + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in row) + " |")
        lines.append(f"overall accuracy {np.mean([needle_accuracy(r, scoring) for r in results]):.3f} over "
                     f"{len(results)} cases")
    lines.append(f"score: {scoring}")
    deviation = placement_deviation(results)
    if deviation:
        lines.append(f"needle placement: actual depth differs from the labelled depth by {deviation[0]:.1f} points on "
                     f"average, {deviation[1]:.1f} at most")
    fallbacks = strict_fallbacks(results) if scoring == "strict" else 0
    if fallbacks:
        lines.append(f"{fallbacks} of {len(results)} results have no response to score strictly: their substring "
                     "score ('correct') is counted")
    return "\n".join(lines)


def _length_label(n: int) -> str:
    """A context length as a tick label: 2048 -> '2K', 1048576 -> '1M', 1000 -> '1,000'."""
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return f"{n:,}"


def plot_needle_results(results: Sequence[dict], path: str, title: str = "", scoring: str = "strict") -> str:
    """Write a PNG: single-needle accuracy over (context length x depth), as in the LWM paper;
    multi-needle accuracy over (N, R) and per context length; both under `scoring`. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError(f"no results to plot into {path}")
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    if not is_multi(results):
        lengths, depths, grid = accuracy_grid(results, scoring)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(lengths) + 3), max(3.5, 0.35 * len(depths) + 2)))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_length_label(x) for x in lengths], rotation=45 if len(lengths) > 8 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        if len(lengths) * len(depths) <= 64:
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    if not np.isnan(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(image, ax=ax, label="accuracy")
        ax.set_title(title or f"Needle in a haystack: accuracy {np.nanmean(grid):.2f} ({scoring} score)")
    else:
        table = multi_accuracy_table(results, scoring)
        ns = sorted({n for n, _ in table})
        rs = sorted({k for _, k in table})
        grid = np.full((len(ns), len(rs)), np.nan)
        for (n, k), by_len in table.items():
            grid[ns.index(n), rs.index(k)] = np.mean(list(by_len.values()))
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        image = left.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        left.set_xticks(range(len(rs)), [str(k) for k in rs])
        left.set_yticks(range(len(ns)), [str(n) for n in ns])
        left.set_xlabel("needles retrieved (R)")
        left.set_ylabel("needles inserted (N)")
        for i in range(len(ns)):
            for j in range(len(rs)):
                if not np.isnan(grid[i, j]):
                    left.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
        fig.colorbar(image, ax=left, label="accuracy (per needle)")
        left.set_title(f"multi-needle accuracy ({scoring} score)")
        for (n, k), by_len in table.items():
            right.plot(list(by_len), list(by_len.values()), marker="o", label=f"N={n}, R={k}")
        right.set_ylim(-0.05, 1.05)
        right.set_xlabel("context length (tokens)")
        right.set_ylabel("accuracy (per needle)")
        right.legend()
        right.set_title(title or "accuracy by context length")
    fig.tight_layout()
    image = io.BytesIO()  # rendered in memory, then written whole (a local file or a bucket object)
    fig.savefig(image, format=os.path.splitext(path)[1][1:] or None, dpi=120)  # the format by suffix, as for a path
    plt.close(fig)
    storage.write_bytes(path, image.getvalue())
    return path


def plot_path_for(output_file: str) -> str:
    """results.json -> results.png (next to the results)."""
    return os.path.splitext(output_file)[0] + ".png"


# ---- entry points ----------------------------------------------------------------------------


def flag_defaults(multi: bool) -> dict[str, Any]:
    """The eval scripts' flags and defaults: the original's names (docs/needle.md, "Flags")."""
    from lwm.checkpoint import StreamingCheckpointer
    from lwm.loading import model_flag_defaults

    flags: dict[str, Any] = dict(
        haystack_file="", max_tokens_per_batch=2000000, output_file="results.json", context_lengths_min=1000,
        context_lengths_max=32000, n_context_length_intervals=3, n_document_depth_intervals=3, n_rounds=2)
    if multi:
        flags.update(n_needles_total=4, n_needles_retrieve=4)
    flags.update(
        max_new_tokens=0,  # ours: tokens generated per prompt (0 = the attention block size, as the original)
        prompt_buffer_tokens=FINAL_CONTEXT_BUFFER,  # ours: context tokens kept for prompt text and answer
        needle_placement="period",  # ours: after the last lone period before the depth (the original's) | sentence_end
        plot=True,  # ours: write a heatmap PNG next to output_file at the end
        score="strict",  # ours: the score of the summary and heatmap: strict | substring (the original's)
        checkpointer=StreamingCheckpointer.get_default_config(), **model_flag_defaults())
    return flags


def check_needle_files(settings: NeedleSettings) -> None:
    """Before any model is built: the haystack exists and its first text line parses, results
    already in output_file parse, and output_file (and the plot next to it) can be written."""
    from lwm.cli import check_input_files, check_output_file

    check_input_files([("--haystack_file", settings.haystack_file)])
    texts = haystack_texts(settings.haystack_file)
    try:
        next(texts)
    finally:
        texts.close()
    check_output_file("--output_file", settings.output_file)
    load_results(settings.output_file)


def main_from_flags(flags, multi: bool) -> list[dict]:
    """What `scripts/eval_needle*.py` run: check the files, load the model, run the cases, plot,
    print a summary."""
    import jax

    from lwm.distributed import JaxDistributedConfig
    from lwm.loading import check_model_files, load_model_from_flags

    if flags.score not in SCORES:
        raise ValueError(f"--score={flags.score!r}; expected one of {', '.join(SCORES)}")
    settings = NeedleSettings(
        haystack_file=flags.haystack_file, output_file=flags.output_file,
        max_tokens_per_batch=flags.max_tokens_per_batch, context_lengths_min=flags.context_lengths_min,
        context_lengths_max=flags.context_lengths_max, n_context_length_intervals=flags.n_context_length_intervals,
        n_document_depth_intervals=flags.n_document_depth_intervals, n_rounds=flags.n_rounds, seed=flags.seed,
        multi=multi, n_needles_total=flags.n_needles_total if multi else 1,
        n_needles_retrieve=flags.n_needles_retrieve if multi else 1, max_new_tokens=flags.max_new_tokens,
        prompt_buffer_tokens=flags.prompt_buffer_tokens, needle_placement=flags.needle_placement)
    check_needle_files(settings)
    check_model_files(flags)
    if flags.load_checkpoint:  # results record the weights they score; another checkpoint's are not added to
        from lwm.checkpoint import checkpoint_identity

        settings = dataclasses.replace(settings, checkpoint=checkpoint_identity(flags.load_checkpoint))
        check_same_checkpoint(load_results(settings.output_file), settings)
    JaxDistributedConfig.initialize(flags.jax_distributed)
    loaded = load_model_from_flags(flags)
    print(f"needle eval: context lengths {settings.context_lengths}, depths {settings.depth_percents}, "
          f"{settings.n_rounds} rounds" + (f", {settings.n_needles_total} needles, {settings.n_needles_retrieve} "
                                            f"asked" if multi else ""), flush=True)
    results = run_needle_eval(settings, loaded)
    print(summary_table(results, flags.score), flush=True)
    if flags.plot and results and jax.process_index() == 0:
        path = plot_needle_results(results, plot_path_for(settings.output_file), scoring=flags.score)
        print(f"heatmap: {path}", flush=True)
    return results
