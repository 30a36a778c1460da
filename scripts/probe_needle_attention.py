"""Attention probe of the multi-needle eval: for the prompts `scripts/eval_needle_multi.py`
builds from the same flags, where each layer and head looks when the model starts its answer
(on which needle, and is it the asked one?), and whether each needle's digits look at its city
(`lwm/needle_attention.py` does the work).

    python scripts/probe_needle_attention.py --load_llama_config=json::configs/reproduce/tiny_model.json \\
        --load_checkpoint=params::outputs/reproduce/runs/stage1/streaming_params \\
        --update_llama_config="dict(theta=10000,max_sequence_length=1088)" --tokenizer=outputs/reproduce/tokenizer \\
        --haystack_file=outputs/reproduce/data/eval.jsonl --context_lengths_min=1024 --context_lengths_max=1024 \\
        --n_context_length_intervals=1 --n_document_depth_intervals=5 --n_rounds=60 --prompt_buffer_tokens=56 \\
        --n_needles_total=4 --n_needles_retrieve=2 --output_file=probe.json

--answer_style=sentence probes a model taught to answer in the needle's sentence (the answer's
'The special magic <city> number is: ' is given before the first digit). --output_file gets {"summary": ..., "cases": [...]} (per case and per layer and head); the
summary table is printed.
"""
import json

from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default
from lwm.needle import flag_defaults

FLAGS, FLAGS_DEF = define_flags_with_default(
    **flag_defaults(multi=True),
    answer_style="number",  # how the model was taught to answer: number | sentence (lwm.retrieval_data)
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lwm import storage
    from lwm.cli import check_input_files, check_output_file
    from lwm.loading import check_model_files, load_model_from_flags
    from lwm.needle import NeedleSettings
    from lwm.needle_attention import probe_cases, summarize, summary_table

    settings = NeedleSettings(
        haystack_file=FLAGS.haystack_file, output_file=FLAGS.output_file, context_lengths_min=FLAGS.context_lengths_min,
        context_lengths_max=FLAGS.context_lengths_max, n_context_length_intervals=FLAGS.n_context_length_intervals,
        n_document_depth_intervals=FLAGS.n_document_depth_intervals, n_rounds=FLAGS.n_rounds, seed=FLAGS.seed,
        multi=True, n_needles_total=FLAGS.n_needles_total, n_needles_retrieve=FLAGS.n_needles_retrieve,
        prompt_buffer_tokens=FLAGS.prompt_buffer_tokens, needle_placement=FLAGS.needle_placement)
    check_input_files([("--haystack_file", settings.haystack_file)])
    check_output_file("--output_file", settings.output_file)
    check_model_files(FLAGS)
    loaded = load_model_from_flags(FLAGS)
    records = probe_cases(settings, loaded, answer_style=FLAGS.answer_style)
    summary = summarize(records)
    if FLAGS.load_checkpoint:  # which weights were probed (content hash, step), as the eval's results record
        from lwm.checkpoint import checkpoint_identity

        summary["checkpoint"] = checkpoint_identity(FLAGS.load_checkpoint)
    summary["answer_style"] = FLAGS.answer_style
    storage.write_text(settings.output_file, json.dumps({"summary": summary, "cases": records}))
    print(summary_table(summary), flush=True)


if __name__ == "__main__":
    cli.run(main)
