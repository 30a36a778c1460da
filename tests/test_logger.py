"""MetricsLogger: metrics.jsonl on a local disk and in a bucket, one row per step after a restart."""
import os

import pytest

from lwm import storage
from lwm.logger import MetricsLogger, read_metrics


def open_logger(output_dir):
    return MetricsLogger(MetricsLogger.get_default_config(dict(output_dir=output_dir, experiment_id="run",
                                                               append_uuid=False)))


@pytest.fixture(params=["local", "bucket"])
def output_dir(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("bucket_dir")


def test_a_restart_keeps_one_row_per_step_and_moves_the_replaced_ones_aside(output_dir, monkeypatch):
    """A run logged steps 1-5 and was killed after its step-3 save: restarted at step 3, rows
    4 and 5 move to metrics.replaced.jsonl (kept, in order) and the rows it logs again take
    their place; a restart with nothing to replace moves nothing."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = open_logger(output_dir)
    for step in range(1, 6):
        first.log({"loss": 10.0 - step}, step=step)
    first.close()

    second = open_logger(output_dir)
    assert second.restart_at(3) == 2
    for step in (4, 5, 6):
        second.log({"loss": 20.0 - step}, step=step)
    second.close()
    run = storage.join(output_dir, "run")
    assert [(r["step"], r["loss"]) for r in read_metrics(storage.join(run, "metrics.jsonl"))] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 16.0), (5, 15.0), (6, 14.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(storage.join(run, "metrics.replaced.jsonl"))] == [
        (4, 6.0), (5, 5.0)]

    third = open_logger(output_dir)
    assert third.restart_at(6) == 0
    assert third.restart_at(0) == 6  # a restart from scratch replaces everything
    third.close()
    assert read_metrics(storage.join(run, "metrics.jsonl")) == []
    assert [r["step"] for r in read_metrics(storage.join(run, "metrics.replaced.jsonl"))] == [4, 5, 1, 2, 3, 4, 5, 6]
    if not storage.is_remote(output_dir):
        assert sorted(os.listdir(run)) == ["metrics.jsonl", "metrics.replaced.jsonl"]  # no temporary file left
