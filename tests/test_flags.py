"""Nested flag groups, the two tokenizer forms, per-entry-point defaults, `--help`."""
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from lwm.config import LLaMAConfig
from lwm.flags import define_flags_with_default, parse_flags_for_test


def test_groups_types_and_tokenizer_forms():
    group = ConfigDict({"type": "adamw", "adamw": ConfigDict({"lr": 0.01, "steps": 10, "bf16": False})})
    flags, _ = define_flags_with_default(t_seed=42, t_opt=group, tokenizer="x/y", t_llama=LLaMAConfig.get_default_config())
    parse_flags_for_test(["--t_seed=3", "--t_opt.adamw.lr=8e-5", "--t_opt.adamw.bf16=True", "--t_llama.theta=5e7",
                          "--t_llama.num_key_value_heads=2", "--t_llama.mesh_dim=1,2,3,4", "--tokenizer.vocab_file=/t"])
    assert flags.t_seed == 3 and flags.t_opt.adamw.lr == 8e-5 and flags.t_opt.adamw.bf16 is True
    assert flags.t_opt.adamw.steps == 10 and flags.t_opt.type == "adamw"
    assert flags.t_llama.theta == 5e7 and flags.t_llama.num_key_value_heads == 2 and flags.t_llama.mesh_dim == "1,2,3,4"
    assert flags.tokenizer == "/t"
    parse_flags_for_test(["--tokenizer=builtin"])
    assert flags.tokenizer == "builtin" and flags.t_seed == 42
    with pytest.raises(Exception, match="Unknown command line flag 'nope'"):
        parse_flags_for_test(["--nope=1"])


def test_each_entry_point_keeps_its_own_defaults():
    first, _ = define_flags_with_default(t_shared=1)
    second, _ = define_flags_with_default(t_shared=2)
    parse_flags_for_test([])
    assert (first.t_shared, second.t_shared) == (1, 2)
    parse_flags_for_test(["--t_shared=7"])
    assert (first.t_shared, second.t_shared) == (7, 7)


@pytest.mark.parametrize("module, expected", [
    ("lwm.chat", ["--load_checkpoint", "--temperature", "--llama.theta", "--[no]verbose"]),
    ("lwm.train", ["--total_steps", "--optimizer.adamw_optimizer.lr", "--train_dataset.type", "--[no]verbose"]),
])
def test_help_lists_the_entry_points_own_flags(module, expected):
    """absl's --help lists the main module's flags; ours are defined in lwm/flags.py on its behalf."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120, stdin=subprocess.DEVNULL)
    for flag in expected:
        assert f"  {flag}:" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
