"""Decode benchmark: prefill time and tokens/s of the shared sampler at several context lengths.

    python -m lwm.benchmarks.decode                                   # tiny model, contexts 256..8192
    python -m lwm.benchmarks.decode --contexts 1024 4096 --new_tokens 64 --batch 4 --out decode.json
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m lwm.benchmarks.decode --mesh_dim 1,1,1,8

Random weights (timings do not depend on the values) of a model given by --hidden, --layers,
--heads, --vocab (default: the tiny test model, hidden 64, 2 layers, 4 heads, vocab 32000).
For each context length, `Sampler.prefill` (the prompt into the KV cache), `Sampler.decode`
(the while_loop of --new_tokens steps from the prefilled state, no eos) and
`Sampler.generate` (both, as one program) are compiled, warmed up, then timed --repeats
times (median): decode tok/s = batch * new_tokens / decode time. "stream" times the steps of
`Sampler.stream`, the Python loop over the same jitted step that chat uses (one host round
trip per token), from the first yielded token to the last.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from lwm import cli


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (first-run allocations)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(contexts=(256, 1024, 4096, 8192), new_tokens: int = 64, batch: int = 1, hidden: int = 64,
              layers: int = 2, heads: int = 4, vocab: int = 32000, chunk: int = 256, repeats: int = 3,
              mesh_dim: str = "", dtype: str = "fp32", seed: int = 0) -> list[dict]:
    from lwm.checkpoint import float_dtype_by_name
    from lwm.config import LLaMAConfig
    from lwm.generation import Sampler, SamplingParams, block_size, padded_prompt_length
    from lwm.llama import LLaMAForCausalLM, init_params
    from lwm.mesh import build_mesh

    mesh = build_mesh(mesh_dim) if mesh_dim else None
    longest = max(padded_prompt_length(c, LLaMAConfig(scan_query_chunk_size=chunk, scan_key_chunk_size=chunk),
                                       mesh) for c in contexts)
    config = LLaMAConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8 or 8,
                         num_hidden_layers=layers, num_attention_heads=heads, max_sequence_length=longest + new_tokens
                         + 64, scan_query_chunk_size=chunk, scan_key_chunk_size=chunk, scan_mlp_chunk_size=chunk)
    compute = float_dtype_by_name(dtype)
    params = jax.tree.map(lambda x: x.astype(compute), init_params(config, jax.random.key(seed)))
    sampler = Sampler(LLaMAForCausalLM(config, dtype=compute, mesh=mesh), params, mesh=mesh)
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    rng = np.random.default_rng(seed)
    rows = []
    for context in contexts:
        ids = rng.integers(3, vocab, (batch, context)).astype(np.int32)
        mask = np.ones_like(ids)
        key = jax.random.key(seed)
        start = time.perf_counter()
        state = sampler.prefill(ids, mask, key, sampling)
        sampler.decode(state, sampling)
        sampler.generate(ids, mask, key, sampling)
        list(sampler.stream(ids, mask, key, sampling))
        compile_s = time.perf_counter() - start
        prefill_s = _median_seconds(lambda: jax.block_until_ready(sampler.prefill(ids, mask, key, sampling).logits),
                                    repeats)
        decode_s = _median_seconds(lambda: sampler.decode(state, sampling), repeats)  # the while_loop alone
        generate_s = _median_seconds(lambda: sampler.generate(ids, mask, key, sampling), repeats)
        stream_steps = []
        for _ in range(repeats):
            stamps = [time.perf_counter() for _ in sampler.stream(ids, mask, key, sampling)]
            stream_steps.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        stream_step_s = statistics.median(stream_steps)
        rows.append({
            "context": context,
            "padded_prompt": padded_prompt_length(context, config, mesh),
            "block_size": block_size(config, mesh),
            "batch": batch,
            "new_tokens": new_tokens,
            "compile_s": compile_s,
            "prefill_s": prefill_s,
            "prefill_tok_per_s": batch * context / prefill_s,
            "generate_s": generate_s,
            "decode_ms_per_step": 1000 * decode_s / new_tokens,
            "decode_tok_per_s": batch * new_tokens / decode_s,
            "stream_ms_per_step": 1000 * stream_step_s,
            "stream_tok_per_s": batch / stream_step_s,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'context':>8} {'prompt':>7} {'batch':>5} {'new':>4} {'prefill s':>10} {'prefill tok/s':>14} "
            f"{'ms/step':>8} {'decode tok/s':>13} {'stream ms/step':>15} {'stream tok/s':>13} {'compile s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['context']:>8} {r['padded_prompt']:>7} {r['batch']:>5} {r['new_tokens']:>4} "
                     f"{r['prefill_s']:>10.4f} {r['prefill_tok_per_s']:>14.0f} {r['decode_ms_per_step']:>8.2f} "
                     f"{r['decode_tok_per_s']:>13.1f} {r['stream_ms_per_step']:>15.2f} {r['stream_tok_per_s']:>13.1f} "
                     f"{r['compile_s']:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=256, help="scan query/key/mlp chunk size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh_dim", default="", help="e.g. 1,1,1,8 (default: no mesh, one device)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", default="decode_benchmark.json", help="JSON file for the rows")
    args = parser.parse_args(argv)
    rows = benchmark(tuple(args.contexts), args.new_tokens, args.batch, args.hidden, args.layers, args.heads,
                     args.vocab, args.chunk, args.repeats, args.mesh_dim, args.dtype)
    print(format_table(rows))
    model = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab, chunk=args.chunk,
                 dtype=args.dtype)
    meta = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "machine": platform.machine(), "jax": jax.__version__,
            "model": model, "mesh_dim": args.mesh_dim}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
