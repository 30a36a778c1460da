"""Does a model look its answers up by key? Teacher-forced accuracy of the key-dependent digit.

In a retrieval answer ("Oslo: 4829173.", or the number alone) only the first digit of the number
depends on the asked key: given it, as teacher forcing gives it, the other six continue the one
needle that starts with it, which a model that has learnt to copy digits gets right without the
key. So the trainer's answer-token accuracy (`acc`) can read 0.95 while the lookup picks the
asked needle no more often than by elimination. This probe scores each answered number's first
digit alone, on training rows (`lwm.retrieval_data` lines) tokenized by the loader's own
`TextProcessor` (`fields_from_example=fields`), in one forward pass per row. The first turn of
a row is scored apart from the later ones: there, nothing has been answered yet, so chance is
1 / (needles in the row); later turns can be answered in part by elimination (a needle whose
number no earlier turn gave), and their chance is 1 / (such needles).

    python scripts/probe_recall_rows.py <model flags> --rows_file=retrieval.jsonl --first_line=7393 \\
        --n_rows=64 --output_file=recall_rows.json
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

import numpy as np

from lwm.needle import NUMBER_DIGITS

NUMBER = re.compile(rf"(?<!\d)\d{{{NUMBER_DIGITS}}}(?!\d)")


@dataclasses.dataclass
class AnsweredNumber:
    turn: int  # 0: the row's first answer (the eval's question)
    position: int  # index of the number's first digit in the row's tokens
    number: str
    candidates: int  # needles of the row whose numbers no earlier turn answered


def loss_runs(loss_masks: Sequence[float]) -> list[tuple[int, int]]:
    """(start, stop) of each run of loss-bearing tokens: one per answer field (the last one
    with the EOS that closes the row)."""
    runs, start = [], None
    for i, m in enumerate(list(loss_masks) + [0.0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def digit_runs(pieces: Sequence[str]) -> list[tuple[int, str]]:
    """(index, number) of each run of NUMBER_DIGITS one-digit pieces ('▁' prefixes ignored)."""
    digits = [p.lstrip("\u2581") for p in pieces]
    found, i = [], 0
    while i + NUMBER_DIGITS <= len(digits):
        window = digits[i:i + NUMBER_DIGITS]
        if all(len(d) == 1 and d.isdigit() for d in window):
            found.append((i, "".join(window)))
            i += NUMBER_DIGITS
        else:
            i += 1
    return found


def answered_numbers(tokenizer, tokens: Sequence[int], loss_masks: Sequence[float],
                     needles: Sequence[str]) -> list[AnsweredNumber]:
    """Every needle number an answer of the row writes, in order, with where its first digit is."""
    pieces = [tokenizer.sp.id_to_piece(int(t)) for t in tokens]
    answered, out = set(), []
    for turn, (start, stop) in enumerate(loss_runs(loss_masks)):
        found = [(start + i, n) for i, n in digit_runs(pieces[start:stop]) if n in needles]
        candidates = len(set(needles) - answered)
        out += [AnsweredNumber(turn, at, n, candidates) for at, n in found]
        answered |= {n for _, n in found}
    return out


def needle_form(context: str, number: str) -> str | None:
    """How the row's context writes the needle of `number`: "eval" (the eval's sentence),
    "short" (one of retrieval_data.SHORT_NEEDLES) or "adjacent" (the city right before the
    digits); None if none of them."""
    from lwm.needle import CITIES, NEEDLE
    from lwm.retrieval_data import ADJACENT_NEEDLE, SHORT_NEEDLES

    # Checked in this order: no form's text is inside a later one's ('Oslo4829173' is in none).
    forms = [("eval", NEEDLE)] + [("short", form) for form in SHORT_NEEDLES] + [("adjacent", ADJACENT_NEEDLE)]
    for name, form in forms:
        if any(form.strip().format(city=city, number=number) in context for city in CITIES):
            return name
    return None


def row_needles(example: dict) -> list[str]:
    """The needles' numbers: the 7-digit numbers of the row's first (context) field."""
    first = example["fields"].split(",")[0].strip("[]")
    return list(dict.fromkeys(NUMBER.findall(example[first])))


def probe_rows(loaded, examples: Sequence[dict], batch_rows: int = 8) -> tuple[list[dict], list[float]]:
    """(one record per answered number: turn, candidates, how its needle is written, whether the
    model's top token at the position before it is its first digit, the probability of that
    digit, and whether the top token is instead another needle's first digit; per row, the share
    of its loss-bearing tokens that are the top token, the trainer's `acc`)."""
    import jax
    import jax.numpy as jnp

    from lwm.data.processors import TextProcessor
    from lwm.generation import padded_prompt_length

    tokenizer, config, mesh = loaded.tokenizer, loaded.config, loaded.mesh
    processor_config = TextProcessor.get_default_config()
    processor_config.fields_from_example = "fields"
    processor = TextProcessor(processor_config, tokenizer)
    logits_of = jax.jit(lambda params, ids: loaded.model.apply({"params": params}, ids).logits)
    data_dim = mesh.shape["dp"] * mesh.shape["fsdp"]
    batch_rows = -(-batch_rows // data_dim) * data_dim
    rows = []
    forms = []
    for i, example in enumerate(examples):
        processed = processor(example, line_index=i)
        needles = row_needles(example)
        context = example[example["fields"].split(",")[0].strip("[]")]
        forms.append({n: needle_form(context, n) for n in needles})
        rows.append((processed.tokens.tolist(), needles,
                     answered_numbers(tokenizer, processed.tokens, processed.loss_masks, needles), processed.loss_masks))
    records, token_accuracy = [], []
    for start in range(0, len(rows), batch_rows):
        batch = rows[start:start + batch_rows]
        length = padded_prompt_length(max(len(t) for t, *_ in batch), config, mesh)
        # Padding after a row changes none of its logits (causal attention).
        ids = [t + [tokenizer.pad_token_id] * (length - len(t)) for t, *_ in batch]
        ids += [ids[-1]] * (batch_rows - len(ids))
        logits = np.asarray(logits_of(loaded.params, jnp.asarray(ids, jnp.int32)))
        for row, ((tokens, needles, numbers, loss_masks), row_logits) in enumerate(zip(batch, logits), start):
            predicted = row_logits[:len(tokens) - 1].argmax(-1)  # the prediction of tokens[1:]
            scored = np.asarray(loss_masks[1:]) > 0
            token_accuracy.append(float(np.mean(predicted[scored] == np.asarray(tokens[1:])[scored])))
            for a in numbers:
                scores = row_logits[a.position - 1].astype(np.float64)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                top = int(np.argmax(scores))
                top_digit = tokenizer.sp.id_to_piece(top).lstrip("\u2581")
                others = {n[0] for n in needles if n != a.number}
                records.append(dict(row=row, turn=a.turn, needles=len(needles), form=forms[row][a.number],
                                    candidates=a.candidates, hit=top == tokens[a.position],
                                    p_first_digit=float(p[tokens[a.position]]),
                                    other_needles_digit=top_digit in others and top_digit != a.number[0]))
    return records, token_accuracy


def summarize(records: Sequence[dict], token_accuracy: Sequence[float]) -> dict:
    """The rows' answer-token accuracy (the trainer's `acc`, every loss-bearing token), and for
    the first turn and later turns: the first digit's accuracy (with a 95% bootstrap interval),
    its mean probability, how often the top token is another needle's first digit, and the
    chance of picking the asked needle among the row's (first turn) or the unanswered ones."""
    from lwm.stats import bootstrap_interval

    out = dict(answer_token_accuracy=float(np.mean(token_accuracy)))
    for name, part in (("first_turn", [r for r in records if r["turn"] == 0]),
                       ("later_turns", [r for r in records if r["turn"] > 0])):
        if not part:
            continue
        hits = [float(r["hit"]) for r in part]
        out[name] = dict(numbers=len(part), first_digit_accuracy=float(np.mean(hits)),
                         first_digit_accuracy_ci95=bootstrap_interval(hits),
                         p_first_digit=float(np.mean([r["p_first_digit"] for r in part])),
                         another_needles_digit=float(np.mean([r["other_needles_digit"] for r in part])),
                         chance=float(np.mean([1.0 / r["candidates"] for r in part])))
    by_form: dict[str, list[dict]] = {}  # every turn together, for each way a needle is written
    for r in records:
        if r.get("form"):
            by_form.setdefault(r["form"], []).append(r)
    if by_form:
        out["by_form"] = {}
        for form, part in sorted(by_form.items()):
            hits = [float(r["hit"]) for r in part]
            out["by_form"][form] = dict(numbers=len(hits), first_digit_accuracy=float(np.mean(hits)),
                                        first_digit_accuracy_ci95=bootstrap_interval(hits),
                                        chance=float(np.mean([1.0 / r["candidates"] for r in part])))
    return out


def summary_table(summary: dict) -> str:
    lines = [f"answer-token accuracy (every loss-bearing token, as the trainer's acc): "
             f"{summary['answer_token_accuracy']:.3f}", "",
             "| answers | numbers | first digit right | 95% interval | chance (pick a needle) | p(first digit) | "
             "top token another needle's first digit |", "|---|---|---|---|---|---|---|"]
    for name in ("first_turn", "later_turns"):
        if name not in summary:
            continue
        s = summary[name]
        lo, hi = s["first_digit_accuracy_ci95"]
        lines.append(f"| {name.replace('_', ' ')} | {s['numbers']} | {s['first_digit_accuracy']:.3f} | {lo:.3f}-{hi:.3f} "
                     f"| {s['chance']:.3f} | {s['p_first_digit']:.3f} | {s['another_needles_digit']:.3f} |")
    if summary.get("by_form"):
        lines += ["", "| needles written | numbers (all turns) | first digit right | 95% interval | chance |",
                  "|---|---|---|---|---|"]
        for form, s in summary["by_form"].items():
            lo, hi = s["first_digit_accuracy_ci95"]
            lines.append(f"| {form} | {s['numbers']} | {s['first_digit_accuracy']:.3f} | {lo:.3f}-{hi:.3f} "
                         f"| {s['chance']:.3f} |")
    return "\n".join(lines)


def read_rows(path: str, first_line: int, n_rows: int) -> list[dict]:
    """Lines first_line .. first_line + n_rows - 1 (0-based) of a retrieval JSONL file."""
    from lwm import storage

    rows, line_number = [], 0  # 1-based, as errors name lines
    with storage.open_file(path, "r") as f:
        for line_number, line in enumerate(f, 1):
            if line_number > first_line + n_rows:
                break
            if line_number <= first_line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {line_number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "fields" not in row:
                raise ValueError(f"{path}, line {line_number}: no 'fields' key; expected a line that "
                                 "`python -m lwm.retrieval_data` writes")
            rows.append(row)
    if len(rows) < n_rows:
        raise ValueError(f"{path}: asked for lines {first_line}..{first_line + n_rows - 1} (0-based), the file has "
                         f"{line_number} lines; lower --first_line or --n_rows")
    return rows
