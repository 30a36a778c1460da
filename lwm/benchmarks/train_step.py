"""Benchmark the trainer's real train step at long sequence lengths, each in a fresh process.

    python -m lwm.benchmarks.train_step                      # 2K, 8K, 32K, 131K (the issue's table)
    python -m lwm.benchmarks.train_step --seqs=2048,8192 --output=bench.json

Configuration (the original LWM's reference measurements used the same): the `debug` model
(hidden 256, 2 layers, 2 heads, vocabulary 32000, 17.3M parameters), fp32, batch 1, chunks
of 512 for attention and MLP (64 per device for the LM head's loss), layers rematerialised
with the 'save_attention' policy (q, k, v and the attention's results kept, the rest
recomputed), mesh `1,1,1,8` on 8 virtual CPU devices (ring attention over sp=8). Each length
runs in its own process so its peak memory is its own. The process also times a jitted
2048^3 float32 matmul: 5 before the steps, 3 after each step, 5 after the last; the median of
them is the machine's matmul rate during those same minutes, so FLOP rates compare with this
machine as it is (shared machines drift by 30% within a run).
Printed: step time (median), tokens/s, model GFLOP/s and its ratio to the matmul rate, peak
process memory (ru_maxrss) and bytes per token.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from lwm import cli
from lwm.benchmarks import MatmulReference
from lwm.host_memory import env_with_huge_pages
from lwm.mesh import cpu_xla_flags

ORIGINAL = {  # the original LWM on this machine (issue 7): step s, tokens/s, peak GB
    2048: (1.98, 1034, 2.3), 8192: (11.1, 738, 5.9), 32768: (92.2, 355, 19.4), 131072: None,
}
# The float32 matmul rate of the machine those numbers come from (issue 7). On a machine with a
# different rate, raw tokens/s do not compare; tokens/s per matmul GFLOP/s do ("vs orig/mm").
ORIGINAL_MATMUL_GFLOPS = 193.0


def child(seq: int, steps: int, chunk: int, loss_chunk: int, mesh_dim: str, layout: str, impl: str,
          remat_block: str) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from lwm.config import load_config
    from lwm.mesh import batch_to_global, build_mesh
    from lwm.trainer import Trainer

    matmul = MatmulReference().sample(5)
    config = load_config("debug").replace(
        max_sequence_length=seq, scan_query_chunk_size=chunk, scan_key_chunk_size=chunk, scan_mlp_chunk_size=chunk,
        scan_loss_chunk_size=loss_chunk, sequence_layout=layout, attention_impl=impl, remat_block=remat_block,
        bos_token_id=1, eos_token_id=2)
    mesh = build_mesh(mesh_dim)
    trainer = Trainer(config, mesh, {"adamw_optimizer": {"lr": 1e-4, "lr_warmup_steps": 10}}, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (1, seq + 1)).astype(np.int32)
    batch = dict(input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], loss_masks=np.ones((1, seq), np.float32),
                 segment_ids=np.ones((1, seq), np.int32), positions=np.arange(seq, dtype=np.int32)[None])
    if layout != "contiguous":
        from lwm.ops.layout import to_layout

        batch = {k: to_layout(v, layout, mesh.shape["sp"], axis=1) for k, v in batch.items()}
    batch = batch_to_global(batch, mesh)
    state = trainer.init_state()
    t = time.perf_counter()
    compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    times, losses = [], []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t)
        matmul.sample(3)
    step_s = statistics.median(times[1:]) if steps > 0 else times[0]
    # The machine's speed drifts during a run (other tenants): the reference matmuls are timed
    # between the steps, so that both medians describe the same minutes.
    matmul.sample(5)
    flops = trainer.flops_per_token(seq) * seq
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(seq=seq, step_s=step_s, step_times=times, compile_s=compile_s, tokens_per_s=seq / step_s,
                model_gflops=flops / step_s / 1e9, matmul_gflops=matmul.gflops,
                flop_ratio=flops / step_s / 1e9 / matmul.gflops, matmul_rates=matmul.rates,
                peak_bytes=peak, bytes_per_token=peak / seq, loss=losses[-1], mesh=mesh_dim, layout=layout,
                impl=config.resolved_attention_impl(), remat_block=remat_block, params=config.num_params(),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--seqs", default="2048,8192,32768,131072")
    parser.add_argument("--steps", default="", help="timed steps per length (default: 5,3,2,1 by length)")
    parser.add_argument("--chunk", type=int, default=512, help="attention and MLP chunk (the original's 512)")
    parser.add_argument("--loss_chunk", type=int, default=64, help="tokens per device per step of the blockwise LM head")
    parser.add_argument("--mesh_dim", default="1,1,1,8")
    parser.add_argument("--layout", default="zigzag", help="contiguous | zigzag | striped")
    parser.add_argument("--impl", default="blockwise")
    parser.add_argument("--remat_block", default="save_attention",
                        help="remat policy of each layer ('' = none; see lwm.llama.remat_policy)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per length")
    parser.add_argument("--output", default="train_step_benchmark.json")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, int(args.steps), args.chunk, args.loss_chunk, args.mesh_dim,
                                          args.layout, args.impl, args.remat_block)), flush=True)
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    steps = [int(s) for s in args.steps.split(",")] if args.steps else [
        5 if s <= 4096 else 3 if s <= 16384 else 2 if s <= 65536 else 1 for s in seqs]
    env = dict(env_with_huge_pages(), XLA_FLAGS=cpu_xla_flags(8, collective_timeout_s=3600), JAX_PLATFORMS="cpu")
    results = []
    for seq, n in zip(seqs, steps):
        cmd = [sys.executable, "-m", "lwm.benchmarks.train_step", f"--child={seq}", f"--steps={n}",
               f"--chunk={args.chunk}", f"--loss_chunk={args.loss_chunk}", f"--mesh_dim={args.mesh_dim}", f"--layout={args.layout}", f"--impl={args.impl}",
               f"--remat_block={args.remat_block}"]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                status = ("killed (out of memory, or stopped)" if proc.returncode in (-9, 137)
                          else f"failed (exit {proc.returncode})")
                results.append(dict(seq=seq, error=status, stderr=proc.stderr[-2000:]))
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
        except subprocess.TimeoutExpired:
            results.append(dict(seq=seq, error=f"timeout after {args.timeout} s"))
        print(format_row(results[-1]), flush=True)
    print(format_table(results))
    with open(args.output, "w") as f:
        json.dump(dict(config=vars(args), results=results, original=ORIGINAL,
                       original_matmul_gflops=ORIGINAL_MATMUL_GFLOPS), f, indent=2)
    print(f"wrote {args.output}")


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['seq']:>8} | {r['error']}"
    orig = ORIGINAL.get(r["seq"])
    speedup = f"{r['tokens_per_s'] / orig[1]:.2f}x" if orig else "-"
    per_matmul = (f"{r['tokens_per_s'] / r['matmul_gflops'] / (orig[1] / ORIGINAL_MATMUL_GFLOPS):.2f}x"
                  if orig else "-")
    return (f"{r['seq']:>8} | {r['step_s']:8.2f} s | {r['tokens_per_s']:8.0f} | {speedup:>7} | {per_matmul:>10} | "
            f"{r['model_gflops']:6.1f} | {r['matmul_gflops']:6.1f} | {r['flop_ratio']:5.2f} | "
            f"{r['peak_bytes'] / 2**30:6.2f} GiB | {r['bytes_per_token'] / 1024:8.1f} KB")


def format_table(results) -> str:
    head = (f"{'seq':>8} | {'step':>10} | {'tok/s':>8} | {'vs orig':>7} | {'vs orig/mm':>10} | {'GF/s':>6} | {'mm GF/s':>6} | "
            f"{'ratio':>5} | {'peak mem':>10} | {'per token':>11}")
    return "\n".join([head, "-" * len(head)] + [format_row(r) for r in results])


if __name__ == "__main__":
    main()
