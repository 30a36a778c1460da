"""Teacher-forced accuracy of the key-dependent digit on retrieval training rows: does the model
look its answers up by key, or copy digits? (`lwm/recall_rows.py` does the work.)

    python scripts/probe_recall_rows.py --load_llama_config=json::configs/reproduce/tiny_model.json \\
        --load_checkpoint=params::outputs/reproduce/runs/stage1/streaming_params \\
        --update_llama_config="dict(theta=10000,max_sequence_length=1088)" --tokenizer=outputs/reproduce/tokenizer \\
        --rows_file=outputs/reproduce/data/retrieval_stage1_....jsonl --first_line=7393 --n_rows=64 \\
        --output_file=recall_rows.json

--output_file gets {"summary": ..., "numbers": [...]} (one record per answered number); the
summary table is printed. Rows are lines first_line .. first_line + n_rows - 1 (0-based) of
--rows_file, as `python -m lwm.retrieval_data` writes them.
"""
import json

from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default
from lwm.loading import model_flag_defaults

FLAGS, FLAGS_DEF = define_flags_with_default(
    rows_file="", first_line=0, n_rows=64, output_file="recall_rows.json", **model_flag_defaults())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lwm import storage
    from lwm.cli import check_input_files, check_output_file
    from lwm.loading import check_model_files, load_model_from_flags
    from lwm.recall_rows import probe_rows, read_rows, summarize, summary_table

    check_input_files([("--rows_file", FLAGS.rows_file)])
    check_output_file("--output_file", FLAGS.output_file)
    if FLAGS.n_rows < 1 or FLAGS.first_line < 0:
        raise app.UsageError(f"--n_rows={FLAGS.n_rows} --first_line={FLAGS.first_line}: expected n_rows >= 1, "
                             "first_line >= 0")
    rows = read_rows(FLAGS.rows_file, FLAGS.first_line, FLAGS.n_rows)
    check_model_files(FLAGS)
    loaded = load_model_from_flags(FLAGS)
    records, token_accuracy = probe_rows(loaded, rows)
    summary = summarize(records, token_accuracy)
    if FLAGS.load_checkpoint:  # which weights were probed (content hash, step), as the eval's results record
        from lwm.checkpoint import checkpoint_identity

        summary["checkpoint"] = checkpoint_identity(FLAGS.load_checkpoint)
    summary.update(rows_file=FLAGS.rows_file, first_line=FLAGS.first_line, n_rows=FLAGS.n_rows)
    storage.write_text(FLAGS.output_file, json.dumps({"summary": summary, "numbers": records}))
    print(summary_table(summary), flush=True)


if __name__ == "__main__":
    cli.run(main)
