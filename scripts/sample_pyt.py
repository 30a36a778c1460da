"""Sample from an LWM text model converted to Hugging Face format, with PyTorch.

    python scripts/convert_lwm_to_hf.py ... --output_dir=/models/lwm-hf --tokenizer=/models/tokenizer.model
    python scripts/sample_pyt.py --model=/models/lwm-hf --prompt="You are a helpful assistant. USER: Hi ASSISTANT:"

The prompt is tokenized exactly as the LWM models were trained (legacy LLaMA SentencePiece,
BOS first: lwm.tokenizer); generation is `transformers.LlamaForCausalLM.generate`.
Needs PyTorch, which the base install leaves out: `pip install -e '.[torch]'`.
"""
import importlib.util

from absl import app

from lwm import cli
from lwm.flags import define_flags_with_default

FLAGS, _ = define_flags_with_default(
    model="",  # folder written by scripts/convert_lwm_to_hf.py
    prompt="",  # text to continue
    tokenizer="",  # tokenizer.model, its folder, a hub name or 'builtin' ('' = the model folder)
    max_new_tokens=128,
    temperature=0.0,  # 0 = greedy
    top_k=0,  # 0 = off
    top_p=1.0,  # 1.0 = off
    seed=0,
)


def generate(model_dir: str, prompt: str, tokenizer_spec: str = "", max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    import torch
    import transformers

    from lwm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_spec or model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    torch.manual_seed(seed)
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv):
    if not FLAGS.model:
        raise app.UsageError("--model is required")
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("sample_pyt.py needs PyTorch, which the base install leaves out: pip install -e '.[torch]'")
    print(generate(FLAGS.model, FLAGS.prompt, FLAGS.tokenizer, FLAGS.max_new_tokens, FLAGS.temperature,
                   FLAGS.top_k, FLAGS.top_p, FLAGS.seed))


if __name__ == "__main__":
    cli.run(main)
