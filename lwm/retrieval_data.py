"""Training data that teaches long-range retrieval: needles in a haystack, questions, answers.

    python -m lwm.retrieval_data --haystack=train.jsonl --tokenizer=tok/tokenizer.model \\
        --seq_length=1024 --n_examples=20000 --output=retrieval_1024.jsonl

Each line is one example in LWM's JSONL form, read with
`--train_dataset.text_processor.fields_from_example=fields` (loss only on the answers, in the
fields outside brackets). An example fills one row of `seq_length` tokens with a multi-turn
chat about one haystack:

    fields: "[prompt],answer0,[turn1],answer1,[turn2],answer2"
    prompt:  You are a helpful assistant. USER: {haystack with K needles} {question 0} Don't give
             information outside the document or repeat your findings. Keep your response short
             and direct. ASSISTANT:
    answer0: 4829173.
    turn1:   USER: What is the special magic Lima number? ASSISTANT:
    answer1: 1098534.
    turn2:   USER: What are the special magic numbers for Oslo, and Doha? ASSISTANT:
    answer2: 7730126, 3302981.

Why this shape:
* The first turn is exactly the needle eval's prompt (`lwm.needle`: its needle sentence,
  question, instruction, and its multi-needle prompt and question wording for a multi question), tokenized the
  same way, so what is learnt is what is measured.
* Every needle is asked about once, in a random order (K needles, K answers per row): many
  retrieval targets per sequence instead of one, as in associative-recall studies, at every
  depth of the context. A few turns ask for two numbers at once (the multi-needle eval).
  Optionally (`asked_fraction`) only that share of a row's needles is asked and the rest stay
  distractors, as in the multi-needle eval: when every needle is asked, each later turn can be
  answered in part without its city, by a needle whose number no turn has given yet (the last
  turn always).
  Optionally (`reverse_fraction`) some needles are asked backwards instead, their number
  given and their city answered. Optionally (`first_digit_fraction`) some later turns ask only for a
  number's first digit, the one answer token the asked key decides.
* Numbers are fresh random 7-digit numbers and cities are drawn from the eval's list, so no
  eval answer can be memorised; the haystack comes from the caller's (training) text only.
* Loss is on the answers only: the task is retrieval, and the haystack's own language-model
  loss would spend a tiny model's capacity on Paul Graham's prose.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from typing import Iterator, Sequence

from lwm import cli
from lwm.needle import (CITIES, MULTI_PROMPT, NEEDLE, PROMPT, QUESTION, insert_needles, multi_question,
                        period_token_ids, random_number)

FOLLOW_UP = " USER: {question} ASSISTANT: "
# How an answer is written: the numbers alone ("4829173, 3302981.") or each in the needle's own
# sentence ("The special magic Oslo number is: 4829173. The special magic ..."), which puts the
# asked city right before the digits in the answer as in the needle (a symmetric, induction-like
# lookup). Both score the same under the eval's strict score (the first numbers of the response).
# Or keyed ("Oslo: 4829173, Doha: 3302981."): the answer names each city right before its number,
# so the model writes the asked city (copied from the question, a directly supervised step) and
# the digits then follow a city one or two tokens back, as in a needle written short: the lookup
# becomes the associative recall small attention models learn, with no second head to find first.
# Or adjacent ("Oslo4829173, Doha3302981."): the city is the very token before the first digit,
# so that digit is predicted at the asked city itself, the query of associative recall in its
# simplest form (the tokenizer splits digits, so nothing merges across the seam).
ANSWER_STYLES = ("number", "sentence", "keyed", "adjacent")
ANSWER_SENTENCE = "The special magic {city} number is: {number}."
ANSWER_KEYED = "{city}: {number}"
ANSWER_ADJACENT = "{city}{number}"
KEYED_ANSWERS = {"keyed": ANSWER_KEYED, "adjacent": ANSWER_ADJACENT}  # the styles that name the city
# A needle asked backwards (its number given, its city the answer): the lookup then goes from the
# digits to the key, which needs each needle's city tied to its digits, the tie the keyed
# (multi-needle) lookup lacks. Never the first turn, which is the eval's question.
REVERSE_QUESTION = "Which city's special magic number is {number}?"
# A needle asked for its first digit only (`first_digit_fraction`): in a whole answer only the
# first digit depends on the key (teacher forcing gives it, and the other six follow the needle
# it starts), so about one answer token in eleven carries the lookup's signal. These turns are
# almost all that token. Never the first turn, which is the eval's question.
FIRST_DIGIT_QUESTION = "What is the first digit of the special magic {city} number?"
# Shorter needles (`short_needle_fraction`), the city 2, 3 and 4 tokens before the first digit
# instead of the eval needle's 5: a head that ties each needle's digits to its city must reach
# back over the filler between them, and with no head doing so yet nothing rewards one (the
# lookup needs both it and a head matching the asked city). Close up, as in associative-recall
# tasks, the tie is a step or two back; mixed with the eval's needle it has to find the city
# at any of these distances, which is what the eval's needles then need. (Tried as
# stage1_short_needles: the multi-needle eval got worse; docs/reproduction.md.)
SHORT_NEEDLES = ("\n{city} {number}\n", "\n{city}: {number}\n", "\n{city} number: {number}\n")
# Every one of those still has a token between the city and the first digit ("▁" before a
# number). Adjacent needles (`adjacent_needle_fraction`) have none: the city is the token right
# before the digits. In token-id recall rows (scripts/train_associative_recall.py) the tiny model
# learns the keyed lookup from random weights only with key and value adjacent; one token between
# them stops it, and a lookup started on adjacent keys then carries to farther ones while
# adjacent rows stay in the mix.
ADJACENT_NEEDLE = "\n{city}{number}\n"
# A phase of repeated spans (`repeat_spans`): a span of random words, cities and digit strings, then
# the same span again as the answer. Every answer token is found the same way, by finding the
# token before it earlier in the row and copying what followed (an induction head), for any token,
# rare city names included. The needle answer's first digit needs exactly that lookup at the
# asked city but supervises it in one answer token of about eleven, and how many steps of needles
# it takes to form moved with the seed (1,300 to past 3,000); dense copying first is how small
# attention models are known to form the lookup early. Spans of random length, so the copy's
# distance back varies as a needle's does.
REPEAT_PROMPT = "You are a helpful assistant. USER: {span} Repeat the text above. ASSISTANT: "
SPAN_NUMBER_SHARE = 0.25  # of a span's items: a digit string of 1-7 digits (else a word or a city)


def read_texts(path: str) -> list[str]:
    """The non-empty `text` of every line of a JSONL file, read once (errors name the line)."""
    from lwm.needle import haystack_texts

    texts = []
    for pass_index, text in haystack_texts(path):  # it wraps around at the end: stop there
        if pass_index:
            break
        texts.append(text)
    return texts


def haystack_stream(texts: Sequence[str], tokenizer) -> list[int]:
    """All texts tokenized and joined with a space: the pool that haystack windows are cut from."""
    tokens: list[int] = []
    for text in texts:
        tokens.extend(tokenizer.encode(("" if not tokens else " ") + text))
    return tokens


def plan_turns(rng: random.Random, cities: list[str], multi_fraction: float) -> list[list[str]]:
    """The cities asked in each turn: each city once, in a random order; with probability
    `multi_fraction` a turn asks for two of them at once."""
    order = rng.sample(cities, len(cities))
    turns = []
    while order:
        take = 2 if len(order) >= 2 and rng.random() < multi_fraction else 1
        turns.append(order[:take])
        order = order[take:]
    return turns


def retrieval_example(rng: random.Random, tokenizer, pool: Sequence[int], seq_length: int, n_needles: int,
                      multi_fraction: float, period_ids, answer_style: str = "number",
                      reverse_fraction: float = 0.0, short_needle_fraction: float = 0.0,
                      asked_fraction: float = 1.0, needles_only: bool = False,
                      first_digit_fraction: float = 0.0, adjacent_needle_fraction: float = 0.0) -> dict:
    """One example (a dict of fields) whose tokens fill at most `seq_length` + 1 positions; with
    `reverse_fraction`, about that share of its needles is asked backwards instead, in a later
    turn (one needle always stays forward, for the first turn: the eval's question). Each needle
    is asked once, one way, so no turn's answer stands in an earlier turn. With
    `short_needle_fraction`, about that share of its needles is written in one of SHORT_NEEDLES;
    with `asked_fraction`, only that share of them (rounded, at least one) is asked at all; with
    `needles_only`, the context is the needles alone (associative recall, no text to search); with
    `first_digit_fraction`, about that share of the later one-city turns asks for the number's
    first digit only (FIRST_DIGIT_QUESTION), the one token of an answer that the key decides; with
    `adjacent_needle_fraction`, about that share of its needles is written ADJACENT_NEEDLE (drawn
    first: the short share is of the rest)."""
    cities = rng.sample(CITIES, n_needles)
    numbers = {c: random_number(rng) for c in cities}
    # `cities` is in random order, so its head is a random subset (no draw: other configs' data stays as was)
    asked_cities = cities[:max(1, math.floor(asked_fraction * n_needles + 0.5))]
    backwards = []
    if reverse_fraction:  # (no draws without it: the examples of a config without it stay as they were)
        backwards = [c for c in asked_cities[1:] if rng.random() < reverse_fraction]
    turns: list = plan_turns(rng, [c for c in asked_cities if c not in backwards], multi_fraction)
    for city in backwards:
        turns.insert(rng.randint(1, len(turns)), city)  # a str: the city asked for by its number
    if first_digit_fraction:  # (no draws without it: the examples of a config without it stay as they were)
        turns = [tuple(t) if i and isinstance(t, list) and len(t) == 1 and rng.random() < first_digit_fraction else t
                 for i, t in enumerate(turns)]  # a 1-tuple: the city asked for its first digit

    def question(asked):
        if isinstance(asked, str):
            return REVERSE_QUESTION.format(number=numbers[asked])
        if isinstance(asked, tuple):
            return FIRST_DIGIT_QUESTION.format(city=asked[0])
        return QUESTION.format(city=asked[0]) if len(asked) == 1 else multi_question(asked)

    def answer(asked):
        if isinstance(asked, str):
            return f"{asked}."
        if isinstance(asked, tuple):
            digit = numbers[asked[0]][0]
            keyed = KEYED_ANSWERS.get(answer_style)
            return (keyed.format(city=asked[0], number=digit) if keyed else digit) + "."
        if answer_style == "sentence":
            return " ".join(ANSWER_SENTENCE.format(city=c, number=numbers[c]) for c in asked)
        if answer_style in KEYED_ANSWERS:
            return ", ".join(KEYED_ANSWERS[answer_style].format(city=c, number=numbers[c]) for c in asked) + "."
        return ", ".join(numbers[c] for c in asked) + "."

    template = MULTI_PROMPT if len(turns[0]) > 1 else PROMPT
    needles = [(tokenizer.encode(needle_template(rng, short_needle_fraction, adjacent_needle_fraction)
                                 .format(city=c, number=numbers[c])),
                rng.uniform(0, 100)) for c in cities]
    fields = {"answer0": answer(turns[0])}
    for i, asked in enumerate(turns[1:], 1):
        fields[f"turn{i}"] = FOLLOW_UP.format(question=question(asked))
        fields[f"answer{i}"] = answer(asked)
    first = question(turns[0])
    after = 2 + sum(len(tokenizer.encode(v)) for v in fields.values())  # bos, eos, answers, later turns
    # The prompt is tokenized as a whole, which can differ from its parts by a token at the seams.
    room = seq_length + 1 - after - len(tokenizer.encode(template.format(context="", question=first))) - 4
    needle_tokens = sum(len(tokens) for tokens, _ in needles)
    too_many = ValueError(f"a {seq_length}-token example cannot hold {n_needles} needles ({needle_tokens} tokens) with "
                          f"its prompt, questions and answers ({seq_length + 1 - room} tokens): raise its length or "
                          "lower its needle count")
    if room < needle_tokens:
        raise too_many
    while True:
        if needles_only:  # the needles alone, in the order of their drawn depths
            context = [t for tokens, _ in sorted(needles, key=lambda needle: needle[1]) for t in tokens]
        else:
            start = rng.randrange(0, max(1, len(pool) - room))
            context = insert_needles(pool[start:start + room], needles, room, period_ids, buffer=0)
        fields["prompt"] = template.format(context=tokenizer.decode(context), question=first)
        total = after + len(tokenizer.encode(fields["prompt"]))
        if total <= seq_length + 1:
            break
        if needles_only:
            raise too_many
        room -= total - (seq_length + 1)
    spec = ["[prompt]", "answer0"]
    for i in range(1, len(turns)):
        spec += [f"[turn{i}]", f"answer{i}"]
    return {"fields": ",".join(spec), **fields}


def needle_template(rng: random.Random, short_needle_fraction: float, adjacent_needle_fraction: float = 0.0) -> str:
    """ADJACENT_NEEDLE with probability `adjacent_needle_fraction`; else the eval's needle, or with
    probability `short_needle_fraction` one of SHORT_NEEDLES."""
    if adjacent_needle_fraction and rng.random() < adjacent_needle_fraction:  # (no draw without it)
        return ADJACENT_NEEDLE
    if short_needle_fraction and rng.random() < short_needle_fraction:  # (no draw without it: data stays as was)
        return rng.choice(SHORT_NEEDLES)
    return NEEDLE


def retrieval_examples(tokenizer, texts: Sequence[str], seq_length: int, n_examples: int, seed: int = 0,
                       needles: tuple[int, int] = (2, 8), multi_fraction: float = 0.2,
                       answer_style: str = "number", reverse_fraction: float = 0.0,
                       short_needle_fraction: float = 0.0, asked_fraction: float = 1.0,
                       needles_only: bool = False, first_digit_fraction: float = 0.0,
                       adjacent_needle_fraction: float = 0.0) -> Iterator[dict]:
    """`n_examples` examples with between needles[0] and needles[1] needles each (inclusive)."""
    if not 1 <= needles[0] <= needles[1] <= len(CITIES):
        raise ValueError(f"needles must satisfy 1 <= low <= high <= {len(CITIES)}, got {needles}")
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer style {answer_style!r}; expected one of {', '.join(ANSWER_STYLES)}")
    for name, fraction in (("reverse_fraction", reverse_fraction), ("short_needle_fraction", short_needle_fraction),
                           ("asked_fraction", asked_fraction), ("first_digit_fraction", first_digit_fraction),
                           ("adjacent_needle_fraction", adjacent_needle_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    pool = haystack_stream(texts, tokenizer)
    if len(pool) < seq_length:
        raise ValueError(f"the haystack text holds {len(pool)} tokens, fewer than seq_length={seq_length}")
    period_ids = period_token_ids(tokenizer)
    rng = random.Random(f"retrieval:{seed}:{seq_length}")
    for _ in range(n_examples):
        yield retrieval_example(rng, tokenizer, pool, seq_length, rng.randint(*needles), multi_fraction, period_ids,
                                answer_style, reverse_fraction, short_needle_fraction, asked_fraction, needles_only,
                                first_digit_fraction, adjacent_needle_fraction)


def span_vocabulary(texts: Sequence[str]) -> list[str]:
    """The words of a repeated span: the haystack's distinct words and the eval's cities."""
    return sorted({w for text in texts for w in re.findall(r"[A-Za-z]+", text)}) + list(CITIES)


def repeat_example(rng: random.Random, tokenizer, vocabulary: Sequence[str], seq_length: int) -> dict:
    """A span of random items in REPEAT_PROMPT and the span again as the answer, fitting
    `seq_length` + 1 positions. Items are drawn while their tokens, each item counted alone, stay
    within a target drawn uniformly from 16 tokens to half the room (the span as a whole can
    tokenize a little shorter, where pieces merge across the spaces)."""
    prompt_tokens = len(tokenizer.encode(REPEAT_PROMPT.format(span="")))
    room = (seq_length + 1 - 2 - prompt_tokens - 4) // 2  # bos, eos; 4 for the seams
    if room < 16:
        raise ValueError(f"a {seq_length}-token example cannot hold a repeated span: its prompt takes "
                         f"{prompt_tokens} tokens; raise the phase's length")
    target = rng.randint(16, room)
    items, used = [], 0
    while True:
        if rng.random() < SPAN_NUMBER_SHARE:
            item = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 7)))
        else:
            item = rng.choice(vocabulary)
        cost = len(tokenizer.encode(" " + item))
        if used + cost > target and items:
            break
        items.append(item)
        used += cost
    while True:  # the seams can cost a token or two more than the items did alone
        span = " ".join(items)
        fields = {"prompt": REPEAT_PROMPT.format(span=span), "answer0": span}
        if 2 + sum(len(tokenizer.encode(v)) for v in fields.values()) <= seq_length + 1 or len(items) == 1:
            return {"fields": "[prompt],answer0", **fields}
        items.pop()


def repeat_examples(tokenizer, texts: Sequence[str], seq_length: int, n_examples: int, seed: int = 0) -> Iterator[dict]:
    """`n_examples` repeated-span examples (their own random stream: a needle phase of the same
    length and seed draws what it would without them)."""
    vocabulary = span_vocabulary(texts)
    rng = random.Random(f"repeat:{seed}:{seq_length}")
    for _ in range(n_examples):
        yield repeat_example(rng, tokenizer, vocabulary, seq_length)


def curriculum_examples(tokenizer, texts: Sequence[str], phases: Sequence[dict], seed: int = 0,
                        multi_fraction: float = 0.2, answer_style: str = "number",
                        reverse_fraction: float = 0.0) -> Iterator[dict]:
    """Examples phase by phase, in order: each phase is a dict with `length` (tokens an example
    fills), `examples` (how many), `needles` ((low, high) per example) and optionally its own
    `reverse_fraction` (else the argument's), `short_needle_fraction` (else none) and
    `asked_fraction` (else every needle is asked), `needles_only` (no haystack text),
    `first_digit_fraction` (else no turn asks for a first digit) and `adjacent_needle_fraction`
    (else none). A phase with `repeat_spans` is repeated spans instead of needles (REPEAT_PROMPT;
    no `needles`).

    Packed into rows of the stage's length (`json_dataset.packed=True`), short early phases put
    several whole examples in a row; read in file order, they are a length curriculum.

    A phase with `spread` (its value: how many of its examples make one row) is not read in
    turn: its examples go in groups of that many, evenly spaced through the first `spread_over`
    examples of the other phases (all of them by default), so short rows keep coming back while
    the long ones are learnt (a rehearsal of the shorter lengths, not a step of the curriculum)."""
    def examples_of(phase):
        if phase.get("repeat_spans"):
            return repeat_examples(tokenizer, texts, phase["length"], phase["examples"], seed)
        return retrieval_examples(tokenizer, texts, phase["length"], phase["examples"], seed,
                                  tuple(phase["needles"]), multi_fraction, answer_style,
                                  phase.get("reverse_fraction", reverse_fraction),
                                  phase.get("short_needle_fraction", 0.0), phase.get("asked_fraction", 1.0),
                                  phase.get("needles_only", False), phase.get("first_digit_fraction", 0.0),
                                  phase.get("adjacent_needle_fraction", 0.0))

    spread = [p for p in phases if p.get("spread")]
    if not spread:
        for phase in phases:
            yield from examples_of(phase)
        return
    ordered = [x for phase in phases if not phase.get("spread") for x in examples_of(phase)]
    groups = []
    for phase in spread:
        examples = list(examples_of(phase))
        groups += [examples[i:i + phase["spread"]] for i in range(0, len(examples), phase["spread"])]
    span = min(len(ordered), spread[0].get("spread_over") or len(ordered))
    # group k goes before ordered example round((k + 1/2) * span / len(groups)): the middle of its share
    at = [round((k + 0.5) * span / len(groups)) for k in range(len(groups))]
    g = 0
    for i, example in enumerate(ordered):
        while g < len(groups) and at[g] <= i:
            yield from groups[g]
            g += 1
        yield example
    for group in groups[g:]:
        yield from group


def write_retrieval_jsonl(path: str, examples) -> str:
    """Write examples one JSON object a line, atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    from lwm.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--haystack", required=True, help="JSONL of {\"text\": ...} (training text only)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--seq_length", type=int, required=True)
    parser.add_argument("--n_examples", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min_needles", type=int, default=2)
    parser.add_argument("--max_needles", type=int, default=8)
    parser.add_argument("--multi_fraction", type=float, default=0.2)
    parser.add_argument("--answer_style", choices=ANSWER_STYLES, default="number",
                        help="answers as the numbers alone, each in the needle's sentence, or after its city "
                             "(keyed: 'Oslo: 4829173'; adjacent: 'Oslo4829173')")
    parser.add_argument("--reverse_fraction", type=float, default=0.0,
                        help="share of needles also asked backwards (the number given, the city answered)")
    parser.add_argument("--short_needle_fraction", type=float, default=0.0,
                        help="share of needles written shorter, the city closer to the number than in the eval")
    parser.add_argument("--asked_fraction", type=float, default=1.0,
                        help="share of each example's needles asked about; the rest stay distractors")
    parser.add_argument("--needles_only", action="store_true",
                        help="the context is the needles alone, no haystack text (associative recall)")
    parser.add_argument("--first_digit_fraction", type=float, default=0.0,
                        help="share of later one-city turns that ask for the number's first digit only")
    parser.add_argument("--adjacent_needle_fraction", type=float, default=0.0,
                        help="share of needles written with the city right before the digits, no token between")
    args = parser.parse_args(argv)
    try:
        texts = read_texts(args.haystack)
        examples = retrieval_examples(load_tokenizer(args.tokenizer), texts, args.seq_length, args.n_examples,
                                      args.seed, (args.min_needles, args.max_needles), args.multi_fraction,
                                      args.answer_style, args.reverse_fraction, args.short_needle_fraction,
                                      args.asked_fraction, args.needles_only, args.first_digit_fraction,
                                      args.adjacent_needle_fraction)
        write_retrieval_jsonl(args.output, examples)
    except (ValueError, OSError) as e:
        print(f"retrieval_data: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.n_examples} examples of {args.seq_length} tokens to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
