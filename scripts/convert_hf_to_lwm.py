"""Convert a Hugging Face Llama folder to LWM streaming params and a config JSON.

    python scripts/convert_hf_to_lwm.py --hf_model=/path/hf_model \\
        --output_checkpoint=/path/streaming_params --output_config=/path/config.json \\
        --scan_layers=True --float_dtype=bf16

Then: `--load_checkpoint='params::/path/streaming_params' --load_llama_config='json::/path/config.json'`.
--output_checkpoint and --output_config may be bucket URLs (gs://bucket/lwm/streaming_params);
--hf_model must be a local folder (safetensors reads local files): copy it down first with
`gcloud storage cp -r gs://bucket/hf_model /path/hf_model`.
"""
import os

from absl import app

from lwm import cli
from lwm.checkpoint import float_dtype_by_name
from lwm.flags import define_flags_with_default
from lwm.hf_conversion import check_local_folder, convert_hf_to_lwm

FLAGS, _ = define_flags_with_default(
    hf_model="",
    output_checkpoint="",
    output_config="",
    scan_layers=True,
    param_scan_axis=0,
    float_dtype="fp32",
)


def main(argv):
    if not (FLAGS.hf_model and FLAGS.output_checkpoint and FLAGS.output_config):
        raise app.UsageError("--hf_model, --output_checkpoint and --output_config are required")
    with cli.naming("--float_dtype"):
        float_dtype = float_dtype_by_name(FLAGS.float_dtype)
    if FLAGS.param_scan_axis not in (0, 1):
        raise app.UsageError(f"--param_scan_axis must be 0 or 1, got {FLAGS.param_scan_axis}")
    check_local_folder("--hf_model", FLAGS.hf_model, output=False)
    cli.check_input_files([("--hf_model", os.path.join(FLAGS.hf_model, "config.json"))])
    config = convert_hf_to_lwm(FLAGS.hf_model, FLAGS.output_checkpoint, FLAGS.output_config,
                               scan_layers=FLAGS.scan_layers, param_scan_axis=FLAGS.param_scan_axis,
                               float_dtype=float_dtype)
    print(f"wrote {FLAGS.output_checkpoint} and {FLAGS.output_config} "
          f"({config.num_hidden_layers} layers, hidden {config.hidden_size})")


if __name__ == "__main__":
    cli.run(main)
