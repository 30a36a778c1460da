"""Convert LWM streaming params to a Hugging Face `LlamaForCausalLM` folder.

    python scripts/convert_lwm_to_hf.py --load_checkpoint='params::/path/streaming_params' \\
        --load_llama_config='7b' --update_llama_config="dict(theta=10000000,max_sequence_length=131072)" \\
        --output_dir=/path/hf_model --tokenizer=/path/tokenizer.model

Scanned and unscanned checkpoints are both accepted (detected from the keys);
`trainstate::` / `trainstate_params::` files work too (their params are read).
The checkpoint and the tokenizer may be in a bucket (`params::gs://bucket/run/streaming_params`);
--output_dir must be a local folder (transformers loads local folders): copy it up afterwards
with `gcloud storage cp -r /path/hf_model gs://bucket/hf_model`.
"""
from absl import app

from lwm import cli
from lwm.config import LLaMAConfig, build_config
from lwm.flags import define_flags_with_default
from lwm.hf_conversion import check_local_folder, convert_lwm_to_hf, hf_dtype

FLAGS, _ = define_flags_with_default(
    load_checkpoint="",
    load_llama_config="",
    update_llama_config="",
    output_dir="",
    dtype="float32",  # float32 | float16 | bfloat16 (of the safetensors written)
    tokenizer="",
    llama=LLaMAConfig.get_default_config(),
)


def main(argv):
    if not FLAGS.load_checkpoint or not FLAGS.output_dir:
        raise app.UsageError("--load_checkpoint and --output_dir are required")
    kind, path = FLAGS.load_checkpoint.split("::", 1) if "::" in FLAGS.load_checkpoint else ("params", FLAGS.load_checkpoint)
    if kind not in ("params", "trainstate", "trainstate_params"):
        raise app.UsageError(f"--load_checkpoint type {kind!r}: expected params::, trainstate:: or trainstate_params::")
    hf_dtype(FLAGS.dtype)
    check_local_folder("--output_dir", FLAGS.output_dir, output=True)
    cli.check_input_files([("--load_checkpoint", path)])
    try:
        config = build_config(FLAGS.load_llama_config, FLAGS.llama, FLAGS.update_llama_config,
                              explicit=FLAGS.explicit("llama"))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    convert_lwm_to_hf(path, config, FLAGS.output_dir, tokenizer=FLAGS.tokenizer or None, dtype=FLAGS.dtype)
    print(f"wrote {FLAGS.output_dir}")


if __name__ == "__main__":
    cli.run(main)
