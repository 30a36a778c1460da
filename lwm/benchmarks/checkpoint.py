"""Checkpoint save overhead at the demo's size: seconds per save, and per step when every step saves.

    python -m lwm.benchmarks.checkpoint                     # 5 timed saves of each kind
    python -m lwm.benchmarks.checkpoint --repeats 3 --out docs/checkpoint_benchmark.json
    python -m lwm.benchmarks.checkpoint --bucket            # also into a GCS emulator on 127.0.0.1

The model is the demo's (configs/tiny_text.json: 2 layers, width 128, 32K vocabulary, 8.6M
parameters) on the demo's mesh (1,1,1,8, 8 virtual CPU devices) and batch (4 x 512 tokens).
Rows, each timed on the same train state:
  before, default          the earlier save: bf16 streaming_params, dataset.pkl, metadata.pkl,
                           each written atomically on its own (not resumable exactly)
  before, optimizer state  the same with save_optimizer_state: a bf16 streaming_train_state
  after, default           the committed save: exact float32 streaming_train_state and the bf16
                           export, staged, committed by one record, renamed
  after, exact_resume off  the committed save of the export alone (the original's files)
  after, optimizer state   the committed save with save_optimizer_state (float32 train state)
With --bucket the three committed saves are timed again into a bucket of a GCS API emulator
(gcp-storage-emulator, in memory, on this machine) through the real gcsfs client: what the
bucket protocol's whole-object uploads, server-side copies and listings cost on top of the
bytes (a real bucket adds the network). A train step is timed too, so the table can say what
saving every step costs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lwm import cli, storage
from lwm.checkpoint import StreamingCheckpointer, save_pickle, save_streaming, train_state_dict
from lwm.config import load_config
from lwm.mesh import batch_to_global, build_mesh
from lwm.trainer import Trainer

DEMO_UPDATES = dict(max_sequence_length=1024, scan_query_chunk_size=64, scan_key_chunk_size=64,
                    scan_mlp_chunk_size=256, scan_loss_chunk_size=256)


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _folder_bytes(path: str) -> int:
    return sum(storage.size(storage.join(path, n)) for n in storage.listdir(path))


def benchmark(repeats: int = 5, seq_length: int = 512, batch: int = 4, bucket: bool = False) -> dict:
    config = load_config("json::configs/tiny_text.json").replace(**DEMO_UPDATES)
    mesh = build_mesh("1,1,1,8")
    trainer = Trainer(config, mesh, {"adamw_optimizer": {"lr_warmup_steps": 10}})
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_length + 1)).astype(np.int32)
    batch_arrays = batch_to_global(dict(
        input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], loss_masks=np.ones((batch, seq_length), np.float32),
        segment_ids=np.ones((batch, seq_length), np.int32),
        positions=np.tile(np.arange(seq_length, dtype=np.int32), (batch, 1))), mesh)
    state, _ = trainer.train_step(state, batch_arrays)  # compile
    jax.block_until_ready(state)

    def step():
        nonlocal state
        state, metrics = trainer.train_step(state, batch_arrays)
        jax.block_until_ready(metrics)

    step_s, _ = _median_seconds(step, repeats)
    dataset_state = {"file_loc": 123456, "index": 789, "total_tokens": 10**6}
    metadata = {"flags": {}, "llama_config": config.to_dict(), "modality": "text"}
    rows = []

    def earlier(folder, optimizer_state):
        def save():  # the earlier code's sequence: each file atomic on its own, no commit
            if optimizer_state:
                save_streaming(os.path.join(folder, "streaming_train_state"),
                               train_state_dict(state.step, state.params, state.opt_state), jnp.bfloat16)
            else:
                save_streaming(os.path.join(folder, "streaming_params"), state.params, jnp.bfloat16)
            save_pickle(dataset_state, os.path.join(folder, "dataset.pkl"))
            save_pickle(dict(metadata, step=1), os.path.join(folder, "metadata.pkl"))
        return save

    def committed(folder, **flags):
        checkpointer = StreamingCheckpointer(flags, folder)
        return lambda: checkpointer.save_all(1, state.params, state.opt_state, metadata=metadata,
                                             dataset_state=dataset_state)

    kinds = [("before, default", lambda d: earlier(d, False)),
             ("before, optimizer state", lambda d: earlier(d, True)),
             ("after, default", lambda d: committed(d)),
             ("after, exact_resume off", lambda d: committed(d, exact_resume=False)),
             ("after, optimizer state", lambda d: committed(d, save_optimizer_state=True))]
    folders = [("", None)]
    if bucket:
        from lwm.gcs_emulator import start_emulator

        folders.append(("bucket: ", start_emulator() + "/checkpoint-benchmark"))
    for where, url in folders:
        for name, make in kinds:
            if url is not None and name.startswith("before"):
                continue  # the earlier code wrote a gs:// path as a local folder
            with tempfile.TemporaryDirectory(dir=".") as local:
                folder = local if url is None else f"{url}/{len(rows)}"
                save = make(folder)
                save()  # warm: first writes allocate the files
                seconds, times = _median_seconds(save, repeats)
                rows.append({"save": where + name, "seconds": seconds, "min_s": min(times), "max_s": max(times),
                             "bytes": _folder_bytes(folder), "resumes_exactly": name.startswith("after") and
                             not name.endswith("exact_resume off"),
                             "overhead_per_step_saving_every_step": seconds / step_s})
    return {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "params": config.num_params(), "step_seconds": step_s, "batch": batch, "seq_length": seq_length,
            "repeats": repeats, "rows": rows}


def table(result: dict) -> str:
    lines = [f"demo model ({result['params'] / 1e6:.1f}M params), train step {result['step_seconds']:.3f} s "
             f"(batch {result['batch']} x {result['seq_length']})",
             f"{'save':34} {'s/save':>8} {'min':>7} {'max':>7} {'MiB':>7} {'exact':>6} {'x step':>7}"]
    for r in result["rows"]:
        lines.append(f"{r['save']:34} {r['seconds']:8.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
                     f"{r['bytes'] / 2**20:7.1f} {str(r['resumes_exactly']):>6} "
                     f"{r['overhead_per_step_saving_every_step']:7.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=cli.HelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="", help="write the result as JSON here")
    parser.add_argument("--bucket", action="store_true", help="also save into a GCS emulator on 127.0.0.1")
    args = parser.parse_args()
    result = benchmark(args.repeats, bucket=args.bucket)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
