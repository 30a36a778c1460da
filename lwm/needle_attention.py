"""Where a model looks when it answers a multi-needle question: an attention probe.

For each multi-needle eval case (the same prompts `scripts/eval_needle_multi.py` builds, from
the same flags), one forward pass gives, for every layer and head,
- at the answer's first position (the last prompt token, which predicts the first digit): the
  attention on each needle's tokens, so one can see whether the heads that read needles pick
  the *asked* needle (a share of 1/N is no better than picking at random) and whether they pick
  the needle whose number the model then starts to write;
- at each needle's own position before its digits: the attention on that needle's city, i.e.
  whether a needle's number is tied to its key where the model reads it;
and from the logits, the probability of each needle's first digit as the answer's first token.
Attention probabilities are recomputed from each layer's input (the model's own hidden states,
norms, projections and RoPE) with a dense softmax; tests check them against Hugging Face
Llama's `output_attentions`.

    python scripts/probe_needle_attention.py <eval_needle_multi.py's flags> --output_file=probe.json
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from lwm.needle import (NUMBER_DIGITS, NeedleSettings, break_token_ids, multi_case, read_haystacks)

log = logging.getLogger(__name__)


# ---- attention probabilities ------------------------------------------------------------------


def layer_params(params, config, layer: int):
    """One decoder layer's params from a scanned (stacked) or unscanned tree."""
    import jax

    stack = params["transformer"]["h"]
    if config.scan_layers:
        return jax.tree.map(lambda x: x.take(layer, axis=config.param_scan_axis), stack["scan_decoder"])
    return stack[str(layer)]


def attention_probe(model):
    """A function (params, ids, mask, query_positions) -> (probabilities [batch, layers, heads,
    queries, seq], last-position logits [batch, vocab]) as float64 numpy: the attention of every
    layer and head from `query_positions` [batch, queries] over the keys of left-padded `ids` with
    `mask` (1 = real token), as the model computes it in its forward pass (positions count real
    tokens, as the needle eval's prompts do). Compiled once per model: build it once and call it
    for every batch."""
    import jax
    import jax.numpy as jnp

    from lwm.llama import RMSNorm, apply_rotary, default_positions, rotary_sin_cos

    config = model.config
    hd, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    hi = jax.lax.Precision.HIGHEST
    norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=jnp.float32)

    @jax.jit
    def probe(params, ids, mask, query_positions):
        out = model.apply({"params": params}, ids, attention_mask=mask, output_hidden_states=True)
        b, s = ids.shape
        sin, cos = rotary_sin_cos(default_positions(mask, None, s, None), hd, config.theta,
                                  config.max_sequence_length)
        keys_allowed = (jnp.arange(s)[None, None, :] <= query_positions[:, :, None]) & (mask[:, None, :] > 0)
        layers = []
        for i in range(config.num_hidden_layers):
            p = layer_params(params, config, i)
            x = norm.apply({"params": p["attention_norm"]}, out.all_hidden_states[i])
            q = jnp.dot(x, p["attention"]["wq"]["kernel"].astype(jnp.float32), precision=hi).reshape(b, s, heads, hd)
            k = jnp.dot(x, p["attention"]["wk"]["kernel"].astype(jnp.float32), precision=hi).reshape(b, s, kv_heads, hd)
            q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
            q = jnp.take_along_axis(q, query_positions[:, :, None, None], axis=1)  # [b, queries, heads, hd]
            k = jnp.repeat(k, heads // kv_heads, axis=2)  # query head h reads kv head h // (heads / kv_heads)
            scores = jnp.einsum("bqhd,bshd->bhqs", q, k, precision=hi) / np.sqrt(hd)
            scores = jnp.where(keys_allowed[:, None], scores, -jnp.inf)
            layers.append(jax.nn.softmax(scores, axis=-1))
        return jnp.stack(layers, 1), out.logits[:, -1].astype(jnp.float32)

    def run(params, ids, mask, query_positions):
        probs, logits = probe(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(query_positions, jnp.int32))
        return np.asarray(probs, np.float64), np.asarray(logits, np.float64)

    return run


# ---- the needles in a prompt ------------------------------------------------------------------


@dataclasses.dataclass
class NeedleSpan:
    city: str
    number: str
    start: int  # first token of "special magic <city> number is: <digits>" in the prompt's ids
    end: int  # one past its last digit
    city_position: int  # the city's (last) token
    before_digits: int  # the token that predicts the number's first digit

    @property
    def first_digit(self) -> str:
        return self.number[0]


def find_subsequence(ids: Sequence[int], part: Sequence[int]) -> int:
    """Index of the first occurrence of `part` in `ids`, -1 when absent."""
    n = len(part)
    for i in range(len(ids) - n + 1):
        if list(ids[i:i + n]) == list(part):
            return i
    return -1


def find_last(ids: Sequence[int], part: Sequence[int]) -> int:
    """Index of the last occurrence of `part` in `ids`."""
    at = find_subsequence(list(reversed(ids)), list(reversed(part)))
    if at < 0:
        raise ValueError(f"the tokens {list(part)} are not in the prompt")
    return len(ids) - at - len(part)


def needle_spans(tokenizer, ids: Sequence[int], needles_info: dict) -> list[NeedleSpan]:
    """Where each needle ({city: [number, depth]}) sits in a prompt's token ids."""
    spans = []
    for city, (number, _) in needles_info.items():
        core = tokenizer.encode(f"special magic {city} number is: {number}")
        start = find_subsequence(ids, core)
        if start < 0:
            raise ValueError(f"the needle of {city} ({number}) is not in the prompt as the tokens {core}: the "
                             "tokenizer splits it differently in context; this probe needs it whole")
        city_tokens = tokenizer.encode(f"special magic {city}")
        end = start + len(core)
        if [tokenizer.sp.id_to_piece(t).lstrip("\u2581") for t in core[-NUMBER_DIGITS:]] != list(number):
            raise ValueError(f"the needle of {city}: its number {number} is not one token per digit "
                             f"({[tokenizer.sp.id_to_piece(t) for t in core]}); this probe needs digit pieces")
        spans.append(NeedleSpan(city, number, start, end, start + len(city_tokens) - 1, end - NUMBER_DIGITS - 1))
    return spans


# ---- the probe ---------------------------------------------------------------------------------


def answer_prefix(tokenizer, number: str, lead: str = "") -> list[int]:
    """The tokens an answer puts before its first digit, tokenized on its own as training data
    tokenizes an answer field: `lead` (the start of a sentence answer, 'The special magic Oslo
    number is: ') and the '▁' that starts a field. The probe reads the position that predicts
    the first digit itself."""
    ids = tokenizer.encode(lead + number)
    if [tokenizer.sp.id_to_piece(t).lstrip("\u2581") for t in ids[-len(number):]] != list(number):
        raise ValueError(f"{lead + number!r} does not end in one token per digit; this probe needs digit pieces")
    return ids[:-len(number)]


def probe_cases(settings: NeedleSettings, loaded, progress: bool = True, answer_style: str = "number") -> list[dict]:
    """One record per eval case: per layer and head, the attention from the answer position on
    each needle and on the asked city in the question, and from each needle's pre-digit position
    on its own city; each needle's first-digit probability (the answer's tokens before its first
    digit given, as in training: with `answer_style` "sentence", 'The special magic <asked city>
    number is: ')."""
    from tqdm import tqdm

    from lwm.generation import padded_prompt_length
    from lwm.retrieval_data import ANSWER_SENTENCE, ANSWER_STYLES

    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer style {answer_style!r}; expected one of {', '.join(ANSWER_STYLES)}")
    tokenizer, config, mesh = loaded.tokenizer, loaded.config, loaded.mesh
    period_ids = break_token_ids(tokenizer, settings.needle_placement)
    haystacks = read_haystacks(settings.haystack_file, tokenizer, settings.n_rounds, max(settings.context_lengths))
    data_dim = mesh.shape["dp"] * mesh.shape["fsdp"]
    probe = attention_probe(loaded.model)
    records = []
    bar = tqdm(total=len(settings.context_lengths) * settings.n_rounds, desc="probe cases", disable=not progress)
    for length in settings.context_lengths:
        cases = [multi_case(tokenizer, haystacks[i], length, i, settings, period_ids) for i in range(settings.n_rounds)]
        leads = [ANSWER_SENTENCE.format(city=c.record["cities_to_retrieve"][0], number="")[:-1]
                 if answer_style == "sentence" else "" for c in cases]
        encoded = [tokenizer.encode(c.prompt, add_bos=True) + answer_prefix(tokenizer, c.answers[0], lead)
                   for c, lead in zip(cases, leads)]
        prompt_length = padded_prompt_length(max(len(e) for e in encoded), config, mesh)
        for start in range(0, len(cases), data_dim):
            batch_cases, batch = cases[start:start + data_dim], encoded[start:start + data_dim]
            batch = batch + [batch[-1]] * (data_dim - len(batch))
            ids, mask = tokenizer.pad(batch, max_length=prompt_length, truncation_side="left")
            shift = [prompt_length - len(e) for e in batch]  # left padding: prompt index i sits at i + shift
            spans = [needle_spans(tokenizer, e, c.record["needles_info"]) for e, c in zip(batch, batch_cases)]
            spans += [spans[-1]] * (data_dim - len(spans))
            queries = np.array([[prompt_length - 1] + [s.before_digits + sh for s in row]
                                for row, sh in zip(spans, shift)], np.int32)
            probs, logits = probe(loaded.params, ids, mask, queries)
            for row, case in enumerate(batch_cases):
                records.append(case_record(case.record, spans[row], shift[row], probs[row], logits[row], tokenizer,
                                           batch[row]))
            bar.update(len(batch_cases))
    bar.close()
    return records


def case_record(record: dict, spans: list[NeedleSpan], shift: int, probs: np.ndarray, logits: np.ndarray, tokenizer,
                ids: Sequence[int]) -> dict:
    """probs [layers, heads, 1 + needles, seq] of one case (query 0: the answer position)."""
    answer = probs[:, :, 0]  # [layers, heads, seq]
    on_needle = {s.city: answer[:, :, s.start + shift:s.end + shift].sum(-1) for s in spans}
    on_first_digit = {s.city: answer[:, :, s.before_digits + 1 + shift] for s in spans}
    # The question comes after every needle: the asked city's last occurrence is in it.
    city_ids = tokenizer.encode(record["cities_to_retrieve"][0])
    at = find_last(ids, city_ids)
    on_question_city = answer[:, :, at + shift:at + len(city_ids) + shift].sum(-1)
    own_city = np.mean([probs[:, :, 1 + k, s.city_position + shift] for k, s in enumerate(spans)], axis=0)
    # Another needle's city as a control: only those before the needle (later ones are out of its sight).
    others = [probs[:, :, 1 + k, o.city_position + shift] for k, s in enumerate(spans) for o in spans
              if o.city_position < s.before_digits and o is not s]
    other_cities = np.mean(others, axis=0) if others else np.full(own_city.shape, np.nan)
    digit_p = _softmax(logits)
    first_digits = {s.city: float(digit_p[tokenizer.sp.piece_to_id(s.first_digit)]) for s in spans}
    return dict(context_length=record["context_length"], seed=record["seed"], asked=record["cities_to_retrieve"],
                needles=[s.city for s in spans], first_digit_p=first_digits,
                distinct_first_digits=len({s.first_digit for s in spans}) == len(spans),
                attention_on_needle={c: m.tolist() for c, m in on_needle.items()},
                attention_on_first_digit={c: m.tolist() for c, m in on_first_digit.items()},
                attention_on_question_city=on_question_city.tolist(),
                needle_to_own_city=own_city.tolist(), needle_to_other_cities=other_cities.tolist())


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def summarize(records: list[dict]) -> dict:
    """Means over cases, per layer and head ([layers][heads]), and the headline numbers: for the
    head with the most attention on needles (on their whole text, and on their first digits), the
    share of it on the asked needle and on the needle whose number the model starts to write."""
    n_needles = len(records[0]["needles"])
    asked = np.array([r["needles"].index(r["asked"][0]) for r in records])
    # The needle the model starts to write: the one whose first digit it rates highest (cases where
    # the needles' first digits differ).
    distinct = [i for i, r in enumerate(records) if r["distinct_first_digits"]]
    chosen = {i: int(np.argmax([records[i]["first_digit_p"][c] for c in records[i]["needles"]])) for i in distinct}
    summary = dict(cases=len(records), needles=n_needles, chance=1.0 / n_needles,
                   cases_with_distinct_first_digits=len(distinct), per_head={})
    shares = {}
    for name, field in (("needle", "attention_on_needle"), ("first_digit", "attention_on_first_digit")):
        mass = np.array([[r[field][c] for c in r["needles"]] for r in records])  # [case, needle, layers, heads]
        total = mass.sum(1)
        share = mass[np.arange(len(records)), asked] / np.maximum(total, 1e-12)
        chosen_share = np.mean([mass[i, chosen[i]] / np.maximum(total[i], 1e-12) for i in distinct], axis=0) \
            if distinct else np.full(total.shape[1:], np.nan)
        shares[name] = total, share, chosen_share
        reader = np.unravel_index(np.argmax(total.mean(0)), total.shape[1:])
        summary.update({f"{name}_reader_head": [int(reader[0]), int(reader[1])],
                        f"{name}_reader_mass": float(total.mean(0)[reader]),
                        f"{name}_reader_asked_share": float(share.mean(0)[reader]),
                        f"{name}_reader_chosen_share": float(chosen_share[reader]),
                        f"{name}_best_asked_share": float(np.max(share.mean(0)))})
        summary["per_head"].update({f"{name}_mass": total.mean(0).tolist(), f"{name}_asked_share": share.mean(0).tolist(),
                                    f"{name}_chosen_share": np.asarray(chosen_share).tolist()})
    # The heads that read the needles' first digits (most of their attention there), each with its
    # asked-needle share and a 95% bootstrap interval over the cases.
    from lwm.stats import bootstrap_interval

    total, share, chosen_share = shares["first_digit"]  # total, share: [case, layers, heads]
    summary["first_digit_readers"] = [
        dict(layer=int(l), head=int(h), mass=float(total[:, l, h].mean()), asked_share=float(share[:, l, h].mean()),
             asked_share_ci95=bootstrap_interval(share[:, l, h].tolist()), chosen_share=float(chosen_share[l, h]))
        for l, h in np.argwhere(total.mean(0) > 0.5)]
    binding = [records[i]["first_digit_p"][records[i]["asked"][0]] / sum(records[i]["first_digit_p"].values())
               for i in distinct]
    own = np.mean([r["needle_to_own_city"] for r in records], 0)
    other = np.nanmean([r["needle_to_other_cities"] for r in records], 0)
    best = np.unravel_index(np.argmax(own), own.shape)
    summary.update(
        first_digit_binding=float(np.mean(binding)) if binding else None,
        first_digit_picks_asked=float(np.mean([chosen[i] == asked[i] for i in distinct])) if distinct else None,
        needle_to_own_city_best=float(own[best]), needle_to_other_city_same_head=float(other[best]))
    summary["per_head"].update(
        question_city=np.mean([r["attention_on_question_city"] for r in records], 0).tolist(),
        needle_to_own_city=own.tolist(), needle_to_other_cities=other.tolist())
    return summary


def summary_table(summary: dict) -> str:
    lines = [f"{summary['cases']} cases, {summary['needles']} needles (chance share {summary['chance']:.2f})"]
    for name, what in (("needle", "needles' text"), ("first_digit", "needles' first digits")):
        layer, head = summary[f"{name}_reader_head"]
        lines.append(f"head reading the {what} most: layer {layer} head {head}, {summary[f'{name}_reader_mass']:.2f} of "
                     f"its attention there; share on the asked needle {summary[f'{name}_reader_asked_share']:.2f}, on "
                     f"the needle the model starts to write {summary[f'{name}_reader_chosen_share']:.2f} (best asked "
                     f"share of any head {summary[f'{name}_best_asked_share']:.2f})")
    lines += [f"heads reading the first digits (> 0.5 of their attention there): " + ("; ".join(
        f"layer {r['layer']} head {r['head']}: {r['mass']:.2f} there, asked share {r['asked_share']:.2f} "
        f"({r['asked_share_ci95'][0]:.2f}-{r['asked_share_ci95'][1]:.2f})" for r in summary["first_digit_readers"])
        or "none")]
    lines += [f"first digit: p(asked) / p(any needle's) = {summary['first_digit_binding']:.2f}; the top needle is the "
              f"asked one in {summary['first_digit_picks_asked']:.2f} of {summary['cases_with_distinct_first_digits']} "
              "cases",
              f"needle's pre-digit token -> its own city: {summary['needle_to_own_city_best']:.3f} (best head; the same "
              f"head -> an earlier needle's city {summary['needle_to_other_city_same_head']:.3f})",
              "", "layer head  on needles  asked  chosen  on 1st digits  asked  chosen  question city  own city"]
    per = summary["per_head"]
    for l, row in enumerate(per["needle_mass"]):
        for h, m in enumerate(row):
            lines.append(f"{l:5d} {h:4d}  {m:10.3f}  {per['needle_asked_share'][l][h]:5.2f}  "
                         f"{per['needle_chosen_share'][l][h]:6.2f}  {per['first_digit_mass'][l][h]:13.3f}  "
                         f"{per['first_digit_asked_share'][l][h]:5.2f}  {per['first_digit_chosen_share'][l][h]:6.2f}  "
                         f"{per['question_city'][l][h]:13.3f}  {per['needle_to_own_city'][l][h]:8.3f}")
    return "\n".join(lines)
