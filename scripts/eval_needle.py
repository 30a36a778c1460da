"""Single-needle needle-in-a-haystack eval with the original's flags (docs/needle.md); `lwm/needle.py` does the work.

    python scripts/eval_needle.py --load_llama_config=7b --load_checkpoint=params::/path/streaming_params \\
        --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" \\
        --tokenizer=LargeWorldModel/LWM-Text-1M --haystack_file=pg19.jsonl --output_file=results.json \\
        --context_lengths_min=1000 --context_lengths_max=32000 --n_context_length_intervals=3 \\
        --n_document_depth_intervals=3 --n_rounds=2 --max_tokens_per_batch=2000000

Results go to --output_file (resumed on restart); a heatmap PNG of accuracy over
(context length x depth) is written next to it (results.json -> results.png). Each result
holds the original's score `correct` and the strict `correct_strict`; the summary and the
heatmap use the strict one (`--score=substring` for the original's). The checkpoint, tokenizer,
haystack and output may be bucket URLs (`--output_file=gs://bucket/needle/results.json`; the
results are uploaded whole after every batch).
"""
from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default
from lwm.needle import flag_defaults, main_from_flags

FLAGS, FLAGS_DEF = define_flags_with_default(**flag_defaults(multi=False))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    main_from_flags(FLAGS, multi=False)


if __name__ == "__main__":
    cli.run(main)
