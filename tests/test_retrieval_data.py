"""Retrieval training data: every answer is a needle's number from its own prompt, examples fit
their length, phases come out in order, and no two examples share a number by construction."""
import re

import pytest

from lwm.retrieval_data import curriculum_examples, retrieval_examples
from lwm.tokenizer import load_tokenizer

TEXTS = [" ".join(f"Sentence {i} of paragraph {p} says little of note." for i in range(40)) for p in range(30)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin")


def example_tokens(example, tokenizer):
    fields = [f.strip("[]") for f in example["fields"].split(",")]
    return 2 + sum(len(tokenizer.encode(example[f])) for f in fields)  # with bos and eos


CITY = r"[A-Z][a-z]+(?: [A-Z][a-z]+)*"


def needles_in(prompt):
    return dict(re.findall(r"The special magic (.+?) number is: (\d{7})", prompt))


def test_every_answer_is_its_needles_number_and_every_needle_is_asked(tokenizer):
    for example in retrieval_examples(tokenizer, TEXTS, 512, 20, seed=3, needles=(2, 6), multi_fraction=0.5):
        needles = needles_in(example["prompt"])
        assert 2 <= len(needles) <= 6
        spec = example["fields"].split(",")
        assert spec[0] == "[prompt]" and all(f.startswith("[") == (i % 2 == 0) for i, f in enumerate(spec))
        questions = [example["prompt"]] + [example[f.strip("[]")] for f in spec[2::2]]
        answers = [example[f] for f in spec[1::2]]
        asked = []
        for question, answer in zip(questions, answers):
            asking = question.rsplit("special magic", 1)[-1]  # the question, after the context's needles
            cities = sorted((c for c in needles if re.search(rf"\b{re.escape(c)}\b", asking)), key=asking.index)
            assert answer == ", ".join(needles[c] for c in cities) + "."
            asked += cities
        assert sorted(asked) == sorted(needles)  # each needle asked exactly once
        assert example_tokens(example, tokenizer) <= 512 + 1


def test_asked_fraction_leaves_the_rest_of_a_row_s_needles_unasked_distractors(tokenizer):
    """Through a curriculum phase: round(K / 2) of K needles asked (at least one), each once and
    answered with its own number; the others never named in a question; which ones, at random."""
    phase = {"length": 512, "examples": 40, "needles": (1, 7), "asked_fraction": 0.5}
    first_in_text_asked, counts = 0, set()
    for example in curriculum_examples(tokenizer, TEXTS, [phase], seed=5, multi_fraction=0.5):
        needles = needles_in(example["prompt"])
        spec = example["fields"].split(",")
        questions = [example["prompt"]] + [example[f.strip("[]")] for f in spec[2::2]]
        asked = []
        for question, answer in zip(questions, [example[f] for f in spec[1::2]]):
            asking = question.rsplit("special magic", 1)[-1]
            cities = sorted((c for c in needles if re.search(rf"\b{re.escape(c)}\b", asking)), key=asking.index)
            assert cities and answer == ", ".join(needles[c] for c in cities) + "."
            asked += cities
        assert len(asked) == len(set(asked)) == max(1, (len(needles) + 1) // 2), (len(needles), asked)
        first_in_text_asked += next(iter(needles)) in asked
        counts.add(len(needles))
    assert counts >= {1, 2, 3, 6, 7} and 0.3 < first_in_text_asked / 40 < 0.9  # not simply the first needles
    with pytest.raises(ValueError, match=r"asked_fraction must be in \[0, 1\], got 2"):
        next(retrieval_examples(tokenizer, TEXTS, 512, 1, asked_fraction=2))


def test_needles_only_puts_the_needles_alone_in_the_context(tokenizer):
    from lwm.retrieval_data import SHORT_NEEDLES

    phase = {"length": 384, "examples": 12, "needles": (3, 5), "needles_only": True, "short_needle_fraction": 0.5}
    forms = "|".join(re.escape(f.strip()).replace(r"\{city\}", r"[A-Z][a-z]+(?: [A-Z][a-z]+)*")
                     .replace(r"\{number\}", r"\d{7}") for f in SHORT_NEEDLES + ("The special magic {city} number is: "
                                                                             "{number}",))
    for example in curriculum_examples(tokenizer, TEXTS, [phase], seed=2, answer_style="keyed"):
        context = re.fullmatch(r"You are a helpful assistant\. USER: (.*) What (?:is|are) the special magic .*",
                               example["prompt"], re.DOTALL).group(1)
        context = " ".join(context.split())  # (a tokenizer may keep the needles' newlines)
        pieces = re.findall(rf"(?:{forms})(?= |$)", context)
        assert " ".join(pieces) == context and 3 <= len(pieces) <= 5  # needles, nothing else
        numbers = re.findall(r"\d{7}", context)
        answered = re.findall(r"\d{7}", " ".join(example[f] for f in example["fields"].split(",")[1::2]))
        assert sorted(answered) == sorted(numbers) and example_tokens(example, tokenizer) <= 384 + 1
        for city, number in re.findall(r"([A-Z][a-z]+(?: [A-Z][a-z]+)*): (\d{7})",
                                       " ".join(example[f] for f in example["fields"].split(",")[1::2])):
            assert re.search(rf"{city}(?: number:|:| number is:)? {number}", context)  # its own number
    with pytest.raises(ValueError, match="a 128-token example cannot hold 4 needles"):
        next(retrieval_examples(tokenizer, TEXTS, 128, 1, needles=(4, 4), needles_only=True))


def test_the_command_line_passes_asked_fraction_and_needles_only_through(tmp_path, tokenizer):
    import json

    from lwm.retrieval_data import main

    haystack, output = tmp_path / "hay.jsonl", tmp_path / "out.jsonl"
    haystack.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main([f"--haystack={haystack}", "--tokenizer=builtin", "--seq_length=384", "--n_examples=5",
                 f"--output={output}", "--min_needles=4", "--max_needles=4", "--asked_fraction=0.5",
                 "--needles_only"]) == 0
    for line in output.read_text().splitlines():
        example = json.loads(line)
        assert "Sentence" not in example["prompt"] and len(needles_in(example["prompt"])) == 4  # no haystack text
        answered = re.findall(r"\d{7}", " ".join(example[f] for f in example["fields"].split(",")[1::2]))
        assert len(answered) == 2  # half of the 4 needles asked


def test_curriculum_phases_in_order_and_within_their_lengths(tokenizer):
    phases = [{"length": 128, "examples": 6, "needles": (1, 2)}, {"length": 384, "examples": 4, "needles": (3, 5)}]
    examples = list(curriculum_examples(tokenizer, TEXTS, phases, seed=0))
    assert len(examples) == 10
    for example in examples[:6]:
        assert example_tokens(example, tokenizer) <= 129 and 1 <= len(needles_in(example["prompt"])) <= 2
    for example in examples[6:]:
        assert 129 < example_tokens(example, tokenizer) <= 385 and 3 <= len(needles_in(example["prompt"])) <= 5


def test_a_spread_phase_comes_back_in_whole_rows_through_the_read_part_of_the_others(tokenizer):
    """A rehearsal phase: groups of `spread` short examples, evenly spaced through the first
    `spread_over` of the other phases' examples, which keep their own order."""
    phases = [{"length": 384, "examples": 12, "needles": (3, 4)},
              {"length": 128, "examples": 9, "needles": (1, 1), "spread": 3, "spread_over": 10}]
    examples = list(curriculum_examples(tokenizer, TEXTS, phases, seed=0))
    alone = list(curriculum_examples(tokenizer, TEXTS, [dict(phases[0])], seed=0))
    short = [example_tokens(x, tokenizer) <= 129 for x in examples]
    assert sum(short) == 9 and [x for x, s in zip(examples, short) if not s] == alone  # same long ones, same order
    # groups of 3 before long examples round((k + 1/2) * 10 / 3) = 2, 5, 8 (0-based): the middle of each share
    assert "".join("s" if s else "L" for s in short) == "LLsssLLLsssLLLsssLLLL"
    # without spread_over a phase spreads through every other example
    everywhere = list(curriculum_examples(tokenizer, TEXTS, [phases[0], {**phases[1], "spread_over": None}], seed=0))
    short = [example_tokens(x, tokenizer) <= 129 for x in everywhere]
    assert "".join("s" if s else "L" for s in short) == "LLsssLLLLsssLLLLsssLL"


def test_reverse_turns_ask_some_needles_cities_by_their_numbers_after_the_eval_s_question(tokenizer):
    reversed_turns = 0
    for example in retrieval_examples(tokenizer, TEXTS, 512, 20, seed=3, needles=(2, 6), reverse_fraction=0.5):
        needles = needles_in(example["prompt"])
        spec = example["fields"].split(",")
        assert "Which city" not in example["prompt"]  # the first turn stays the eval's question
        forward = []
        for turn, answer in zip(spec[2::2], spec[3::2]):
            asked = re.fullmatch(r" USER: Which city's special magic number is (\d{7})\? ASSISTANT: ", example[turn[1:-1]])
            if asked:
                reversed_turns += 1
                city = [c for c, n in needles.items() if n == asked.group(1)]
                assert example[answer] == f"{city[0]}." and len(city) == 1
            else:
                forward.append(example[answer])
        asked_back = re.findall(r"Which city's special magic number is (\d{7})", str(example))
        numbers = re.findall(r"\d{7}", example["answer0"] + " ".join(forward))
        assert sorted(numbers + asked_back) == sorted(needles.values())  # every needle asked once, one way
        assert example_tokens(example, tokenizer) <= 512 + 1
    assert 0.3 < reversed_turns / sum(len(needles_in(x["prompt"])) for x in retrieval_examples(
        tokenizer, TEXTS, 512, 20, seed=3, needles=(2, 6), reverse_fraction=0.5)) < 0.7
    with pytest.raises(ValueError, match=r"reverse_fraction must be in \[0, 1\], got 1.5"):
        next(retrieval_examples(tokenizer, TEXTS, 512, 1, reverse_fraction=1.5))


def test_short_needles_write_the_city_closer_to_its_number_in_about_the_asked_share(tokenizer):
    from lwm.needle import CITIES, NEEDLE
    from lwm.retrieval_data import SHORT_NEEDLES

    forms = [NEEDLE.strip()] + [form.strip() for form in SHORT_NEEDLES]
    used = [0] * len(forms)
    for example in retrieval_examples(tokenizer, TEXTS, 512, 30, seed=3, needles=(2, 6), short_needle_fraction=0.5):
        prompt, spec = example["prompt"], example["fields"].split(",")
        answered = {}  # city asked -> the number answered, turn by turn
        for question, answer in zip([prompt] + [example[f.strip("[]")] for f in spec[2::2]], spec[1::2]):
            several, one = re.findall(r"special magic (?:numbers for ([^?]+)|([^:?]+?) number)\?", question)[-1]
            cities = re.split(r", (?:and )?", several or one)
            answered.update(zip(cities, re.findall(r"\d{7}", example[answer])))
        numbers = re.findall(r"\d{7}", prompt)
        assert sorted(numbers) == sorted(answered.values())  # every needle asked, whatever its form
        for number in numbers:
            written = [(i, city) for i, form in enumerate(forms) for city in CITIES
                       if re.search(rf"(?<!\w){re.escape(form.format(city=city, number=number))}", prompt)]
            assert len(written) == 1, (number, written)
            form, city = written[0]
            used[form] += 1
            assert answered[city] == number  # the city the needle names is the one whose number it is
    assert 0.35 < sum(used[1:]) / sum(used) < 0.65 and min(used) > 0  # about half short, every form in use
    with pytest.raises(ValueError, match=r"short_needle_fraction must be in \[0, 1\], got -0.1"):
        next(retrieval_examples(tokenizer, TEXTS, 512, 1, short_needle_fraction=-0.1))


def test_adjacent_needles_and_answers_put_the_city_token_right_before_the_first_digit(tokenizer):
    """About the asked share of needles is written '\\nOslo4829173\\n', the city's last token
    the very token before the digits (no '▁' between, unlike every short form); with adjacent
    answers every turn writes 'Oslo4829173' for the asked city and scores as its number."""
    from lwm.needle import score_strict

    phase = {"length": 384, "examples": 30, "needles": (2, 5), "needles_only": True, "adjacent_needle_fraction": 0.5}
    adjacent = total = 0
    for example in curriculum_examples(tokenizer, TEXTS, [phase], seed=6, multi_fraction=0.5,
                                       answer_style="adjacent"):
        prompt, spec = example["prompt"], example["fields"].split(",")
        written = {number: (city, False) for city, number in needles_in(prompt).items()}
        written.update({number: (city, True) for city, number in re.findall(rf"\n({CITY})(\d{{7}})\n", prompt)})
        assert sorted(written) == sorted(re.findall(r"\d{7}", prompt))  # each needle in one of the two forms
        for number, (city, is_adjacent) in written.items():
            if is_adjacent:
                tokens = tokenizer.encode(f"{city}{number}")
                pieces = [tokenizer.decode([t]) for t in tokens]
                assert pieces[-7:] == list(number) and tokens[:-7] == tokenizer.encode(city)  # nothing between
        adjacent += sum(a for _, a in written.values())
        total += len(written)
        by_city = {city: number for number, (city, _) in written.items()}
        answered = []
        for answer in (example[f] for f in spec[1::2]):
            stated = re.findall(rf"({CITY})(\d{{7}})", answer)
            assert stated and ", ".join(f"{c}{n}" for c, n in stated) + "." == answer
            assert all(by_city[c] == n for c, n in stated) and all(score_strict(answer, [n for _, n in stated]))
            answered += [c for c, _ in stated]
        assert sorted(answered) == sorted(by_city)  # every needle asked once
        assert example_tokens(example, tokenizer) <= 384 + 1
    assert 0.3 < adjacent / total < 0.7
    with pytest.raises(ValueError, match=r"adjacent_needle_fraction must be in \[0, 1\], got 2"):
        next(retrieval_examples(tokenizer, TEXTS, 512, 1, adjacent_needle_fraction=2))


def test_sentence_and_keyed_answers_name_their_city_and_score_as_the_numbers(tokenizer):
    from lwm.needle import score_strict

    for example in retrieval_examples(tokenizer, TEXTS, 512, 10, seed=1, needles=(2, 6), multi_fraction=0.5,
                                      answer_style="sentence"):
        needles = needles_in(example["prompt"])
        spec = example["fields"].split(",")
        for answer in (example[f] for f in spec[1::2]):
            stated = re.findall(r"The special magic (.+?) number is: (\d{7})\.", answer)
            assert stated and " ".join(f"The special magic {c} number is: {n}." for c, n in stated) == answer
            assert all(needles[c] == n for c, n in stated)  # each the asked city's own number
            assert all(score_strict(answer, [n for _, n in stated]))
        assert example_tokens(example, tokenizer) <= 512 + 1
    with pytest.raises(ValueError, match="a 128-token example cannot hold 3 needles .* raise its length or lower"):
        next(retrieval_examples(tokenizer, TEXTS, 128, 1, needles=(3, 3), answer_style="sentence"))
    for example in retrieval_examples(tokenizer, TEXTS, 512, 10, seed=1, needles=(2, 6), multi_fraction=0.5,
                                      answer_style="keyed"):
        needles = needles_in(example["prompt"])
        spec = example["fields"].split(",")
        questions = [example["prompt"]] + [example[f.strip("[]")] for f in spec[2::2]]
        for question, answer in zip(questions, (example[f] for f in spec[1::2])):
            stated = re.findall(r"([A-Z][a-z]+(?: [A-Z][a-z]+)*): (\d{7})", answer)
            assert stated and ", ".join(f"{c}: {n}" for c, n in stated) + "." == answer
            assert all(needles[c] == n for c, n in stated)
            asking = question.rsplit("special magic", 1)[-1]
            assert [c for c, _ in stated] == sorted((c for c, _ in stated), key=asking.index)  # as asked
            assert all(score_strict(answer, [n for _, n in stated]))
    with pytest.raises(ValueError, match="answer style 'words'; expected one of number, sentence, keyed, adjacent"):
        next(retrieval_examples(tokenizer, TEXTS, 256, 1, answer_style="words"))


def test_bad_needle_range_is_refused(tokenizer):
    with pytest.raises(ValueError, match="needles must satisfy"):
        next(retrieval_examples(tokenizer, TEXTS, 256, 1, needles=(0, 2)))


def test_first_digit_turns_ask_later_needles_for_their_first_digit_only(tokenizer):
    """With first_digit_fraction, about that share of the later one-city turns asks for the
    first digit of the city's number, answered with it alone ('Oslo: 4.' when keyed); the first
    turn stays the eval's question, every needle is still asked once, and without the option the
    examples are the ones written before it existed."""
    from lwm.retrieval_data import FIRST_DIGIT_QUESTION

    asked_first_digit = single_later = 0
    for style in ("number", "keyed"):
        phase = {"length": 512, "examples": 30, "needles": (3, 6), "first_digit_fraction": 0.5}
        for example in curriculum_examples(tokenizer, TEXTS, [phase], seed=4, multi_fraction=0.3, answer_style=style):
            needles = needles_in(example["prompt"])
            spec = example["fields"].split(",")
            assert "first digit" not in example["prompt"]
            asked = []
            for turn, answer in zip(spec[2::2], spec[3::2]):
                question, answer = example[turn.strip("[]")], example[answer]
                city = re.search(r"the special magic (.+?) number\?", question)
                if "first digit" in question:
                    city = re.search(FIRST_DIGIT_QUESTION.replace("?", r"\?").replace("{city}", "(.+?)"), question)[1]
                    assert answer == (f"{city}: " if style == "keyed" else "") + f"{needles[city][0]}."
                    asked_first_digit += 1
                    asked.append(city)
                elif city:
                    single_later += 1
                    asked.append(city[1])
                else:
                    asked += re.findall(r"(?:for |, and |, )([A-Z][a-z]+(?: [A-Z][a-z]+)*)", question)
            first = re.search(r"special magic (?:(.+?) number\?|numbers for (.+?)\?)", example["prompt"])
            asked += [first[1]] if first[1] else re.split(r", and |, ", first[2])
            assert sorted(asked) == sorted(needles)  # each needle asked once, one way
    assert 0.35 < asked_first_digit / (asked_first_digit + single_later) < 0.65
    plain = {"length": 512, "examples": 5, "needles": (3, 6)}
    assert list(curriculum_examples(tokenizer, TEXTS, [plain], seed=4)) == \
        list(curriculum_examples(tokenizer, TEXTS, [{**plain, "first_digit_fraction": 0.0}], seed=4))
    with pytest.raises(ValueError, match=r"first_digit_fraction must be in \[0, 1\], got 1.5"):
        next(retrieval_examples(tokenizer, TEXTS, 512, 1, first_digit_fraction=1.5))


def test_repeated_spans_answer_their_prompt_s_span_and_leave_needle_phases_as_they_were(tokenizer):
    """A `repeat_spans` phase: each answer is the span its prompt holds, word for word; spans of
    random length, from a few tokens to about half the example (the copy's distance back varies);
    words, cities and digit strings all in them; every example fits. A needle phase of the same
    length after it draws the examples it draws alone."""
    from lwm.needle import CITIES
    from lwm.retrieval_data import REPEAT_PROMPT

    needle_phase = {"length": 256, "examples": 5, "needles": (2, 4)}
    examples = list(curriculum_examples(tokenizer, TEXTS, [{"length": 256, "examples": 60, "repeat_spans": True},
                                                           needle_phase], seed=4))
    spans, items = [], []
    for example in examples[:60]:
        assert example["fields"] == "[prompt],answer0"
        span = example["answer0"]
        assert example["prompt"] == REPEAT_PROMPT.format(span=span)
        assert example_tokens(example, tokenizer) <= 256 + 1
        spans.append(len(tokenizer.encode(span)))
        items += span.split(" ")
    assert min(spans) < 30 and max(spans) > 90
    assert any(i in CITIES for i in items) and any(i.isdigit() for i in items)
    assert any(i.isalpha() and i not in CITIES for i in items)
    assert examples[60:] == list(curriculum_examples(tokenizer, TEXTS, [needle_phase], seed=4))
    with pytest.raises(ValueError, match="cannot hold a repeated span"):
        list(curriculum_examples(tokenizer, TEXTS, [{"length": 48, "examples": 1, "repeat_spans": True}]))
