"""Multi-needle needle-in-a-haystack eval: N needles at distinct depths, R of them asked
(the original's flags; docs/needle.md); `lwm/needle.py` does the work.

    python scripts/eval_needle_multi.py --load_llama_config=7b --load_checkpoint=params::/path/streaming_params \\
        --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" \\
        --tokenizer.vocab_file=/path/tokenizer.model --haystack_file=pg19.jsonl --output_file=multi.json \\
        --n_needles_total=4 --n_needles_retrieve=2 --n_rounds=10

Results (each needle scored) go to --output_file (resumed on restart); a plot of accuracy over
(N, R) and context length is written next to it (multi.json -> multi.png). Each result holds
the original's score `correct` and the strict `correct_strict` (a needle counts when it is among
the response's first R numbers); the summary and plot use the strict one (`--score=substring`
for the original's). The checkpoint, tokenizer, haystack and output may be bucket URLs
(`--output_file=gs://bucket/needle/multi.json`; the results are uploaded whole after every batch).
"""
from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default
from lwm.needle import flag_defaults, main_from_flags

FLAGS, FLAGS_DEF = define_flags_with_default(**flag_defaults(multi=True))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    main_from_flags(FLAGS, multi=True)


if __name__ == "__main__":
    cli.run(main)
