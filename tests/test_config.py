"""Config construction, validation, sources and the safe update parser."""
import json
import pickle

import pytest

from lwm.config import (STANDARD_CONFIGS, LLaMAConfig, VideoLLaMAConfig, build_config, load_config,
                        parse_config_updates)


def test_standard_sizes_match_spec():
    expected = {"debug": (256, 256, 2, 2, 2048), "200m": (1024, 2048, 14, 8, 2048), "1b": (2048, 5504, 22, 16, 2048),
                "3b": (3200, 8640, 26, 32, 2048), "7b": (4096, 11008, 32, 32, 4096),
                "13b": (5120, 13824, 40, 40, 2048), "30b": (6656, 17920, 60, 52, 2048),
                "65b": (8192, 22016, 80, 64, 2048)}
    for name, (h, i, n, a, s) in expected.items():
        c = load_config(name)
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.max_sequence_length) == (h, i, n, a, s)
        assert c.rms_norm_eps == (1e-5 if name == "65b" else 1e-6)
        assert c.num_key_value_heads == a and c.vocab_size == 32000
    assert set(STANDARD_CONFIGS) == set(expected)
    assert abs(load_config("7b").num_params() - 6.738e9) < 1e6  # LLaMA-2 7B: 6,738,415,616


def test_update_parser_accepts_literals():
    got = parse_config_updates("dict(theta=1e7, max_sequence_length=131072, scan_attention=True, "
                               "remat_block='nothing_saveable', x=None, t=(1, -2), neg=-3)")
    assert got == {"theta": 1e7, "max_sequence_length": 131072, "scan_attention": True,
                   "remat_block": "nothing_saveable", "x": None, "t": (1, -2), "neg": -3}
    assert parse_config_updates("{'theta': 5}") == {"theta": 5}
    assert parse_config_updates("") == {}


@pytest.mark.parametrize("text, message", [
    ("dict(a=foo(1))", "not a literal"),
    ("dict(a=__import__('os').system('true'))", "not a literal"),
    ("eval('1')", "dict(key=value"),
    ("dict(**x)", "'**' expansion"),
    ("dict(1)", "keyword arguments only"),
    ("1 + 1", "must look like dict"),
    ("dict(a=1, a=2)", "given twice"),
    ("dict(a=", "cannot parse"),
    ("{1: 2}", "keys must be strings"),
])
def test_update_parser_rejects(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse_config_updates(text)


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_attention_heads=3), "hidden_size=100 is not divisible by num_attention_heads=3"),
    (dict(num_attention_heads=4, num_key_value_heads=3, hidden_size=64), "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    (dict(hidden_size=12, num_attention_heads=4), "head_dim=3 must be even"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(sequence_layout="spiral"), "sequence_layout='spiral'"),
    (dict(remat_block="some_policy"), "remat_block='some_policy'"),
    (dict(param_scan_axis=2), "param_scan_axis must be 0 or 1"),
    (dict(scan_query_chunk_size=0), "scan_query_chunk_size must be positive"),
    (dict(resid_pdrop=1.5), "resid_pdrop must be in"),
])
def test_validation_names_the_numbers(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLaMAConfig(**fields)


def test_mesh_check_and_vision_validation():
    c = LLaMAConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    c.check_mesh({"tp": 2})
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by the mesh's tp=4"):
        c.check_mesh({"tp": 4})
    with pytest.raises(ValueError, match="sample_mode"):
        VideoLLaMAConfig(sample_mode="audio")
    with pytest.raises(ValueError, match="vision_vocab_size"):
        VideoLLaMAConfig(vision_vocab_size=100)


def test_json_round_trip_and_original_dumps(tmp_path):
    c = load_config("debug").replace(theta=5e7, num_key_value_heads=1, attention_impl="dense")
    path = tmp_path / "c.json"
    c.save_json(str(path))
    assert load_config(f"json::{path}") == c
    # A transformers PretrainedConfig dump written by the original code: extra keys ignored.
    original = dict(c.to_dict(), id2label={"0": "LABEL_0"}, transformers_version="4.38.0",
                    architectures=None, mesh_dim="1,-1,4,1", fcm_min_ratio=0.0, torch_dtype="float32")
    del original["num_key_value_heads"], original["attention_impl"]
    path.write_text(json.dumps(original))
    loaded = load_config(f"json::{path}")
    assert loaded.theta == 5e7 and loaded.num_key_value_heads == loaded.num_attention_heads
    assert loaded.mesh_dim == "1,-1,4,1"
    with pytest.raises(ValueError, match="unknown LLaMAConfig field"):
        LLaMAConfig.from_dict(original, strict=True)


def test_pickle_source_and_errors(tmp_path):
    c = load_config("debug")
    path = tmp_path / "metadata.pkl"
    path.write_bytes(pickle.dumps({"step": 3, "llama_config": c.to_dict()}))
    assert load_config(f"pickle::{path}") == c
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        load_config("huge")
    with pytest.raises(ValueError, match="unknown config source 'yaml'"):
        load_config("yaml::x")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(f"json::{bad}")
    with pytest.raises(ValueError, match="theta must be a number"):
        c.replace(theta="big")
    with pytest.raises(ValueError, match=r"unknown LLaMAConfig field\(s\) \['thetta'\]"):
        c.replace(thetta=1)


def test_build_config_follows_the_original_order(tokenizer):
    flags = LLaMAConfig.get_default_config()
    flags.scan_query_chunk_size = 256
    c = build_config("debug", flags, "dict(theta=1e7, scan_key_chunk_size=512)", tokenizer, "1,-1,1,1")
    assert (c.hidden_size, c.scan_query_chunk_size, c.scan_key_chunk_size, c.theta) == (256, 256, 512, 1e7)
    assert (c.bos_token_id, c.eos_token_id, c.mesh_dim) == (1, 2, "1,-1,1,1")
    flags = LLaMAConfig.get_default_config()
    flags.vocab_size, flags.hidden_size, flags.num_attention_heads = 100, 64, 4
    c = build_config("", flags, "", tokenizer)
    assert c.vocab_size == 32000 and c.hidden_size == 64  # grown to the tokenizer's size
    # update strings are applied last and are strict about names
    with pytest.raises(ValueError, match="unknown"):
        build_config("debug", LLaMAConfig.get_default_config(), "dict(not_a_field=1)")


def test_model_flags_with_a_loaded_config_are_an_error(tokenizer):
    """--llama.theta with --load_llama_config used to be dropped silently (trained at the loaded theta)."""
    from lwm.flags import define_flags_with_default, parse_flags_for_test

    flags, _ = define_flags_with_default(cfgtest_llama=LLaMAConfig.get_default_config())
    parse_flags_for_test(["--cfgtest_llama.theta=5e7", "--cfgtest_llama.scan_query_chunk_size=256"])
    with pytest.raises(ValueError) as error:
        build_config("debug", flags.cfgtest_llama, "", tokenizer)
    message = str(error.value)
    assert "\n" not in message and "--llama.theta=50000000.0" in message
    assert '--update_llama_config="dict(theta=50000000.0)"' in message
    # the advice given works: the same value through the update string reaches the config
    assert build_config("debug", LLaMAConfig.get_default_config(), "dict(theta=50000000.0)").theta == 5e7
    for field, value in (("max_sequence_length", 131072), ("hidden_size", 999), ("num_key_value_heads", 1)):
        llama = LLaMAConfig.get_default_config({field: value})
        with pytest.raises(ValueError, match=rf"--llama\.{field}={value}.*dict\({field}={value}\)"):
            build_config("debug", llama, "")
    llama = VideoLLaMAConfig.get_default_config({"sample_mode": "vision"})
    with pytest.raises(ValueError, match="--llama.sample_mode='vision'"):
        build_config("debug", llama, "", cls=VideoLLaMAConfig)


def test_runtime_and_default_flags_pass_with_a_loaded_config():
    flags = LLaMAConfig.get_default_config(dict(scan_query_chunk_size=128, scan_key_chunk_size=64,
                                                attention_impl="dense", remat_block="nothing_saveable"))
    flags.theta = LLaMAConfig().theta  # set to its default: changes nothing, so it is no error
    c = build_config("7b", flags, "")
    assert (c.scan_query_chunk_size, c.scan_key_chunk_size, c.attention_impl, c.remat_block) == (
        128, 64, "dense", "nothing_saveable")
    assert (c.hidden_size, c.max_sequence_length, c.theta) == (4096, 4096, 10000.0)  # the size's own fields
    # a size whose fields differ from the flag defaults: unset --llama.* flags do not fight them
    c = build_config("debug", LLaMAConfig.get_default_config(), "")
    assert (c.hidden_size, c.max_sequence_length) == (256, 2048)


def test_model_flags_without_a_loaded_config_are_the_config():
    flags = LLaMAConfig.get_default_config(dict(theta=5e7, max_sequence_length=8192, hidden_size=64,
                                                num_attention_heads=4))
    c = build_config("", flags, "")
    assert (c.theta, c.max_sequence_length, c.hidden_size) == (5e7, 8192, 64)


def test_entry_point_reports_an_ignored_model_flag_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "lwm.chat", "--load_llama_config=debug", "--llama.theta=5e7",
                          "--tokenizer=builtin", "--prompt=hi"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "--llama.theta=50000000.0" in last and "--update_llama_config" in last


def test_auto_attention_impl():
    c = LLaMAConfig()
    assert c.resolved_attention_impl("cpu") == "blockwise"
    assert c.resolved_attention_impl("gpu") == "pallas" and c.resolved_attention_impl("tpu") == "pallas"
    assert c.replace(scan_attention=False).resolved_attention_impl("gpu") == "dense"
    assert c.replace(scan_attention=False, use_flash_attention=True).resolved_attention_impl("gpu") == "pallas"
    assert c.replace(attention_impl="dense").resolved_attention_impl("tpu") == "dense"


def test_unset_kv_heads_follow_attention_heads():
    c = load_config("7b").replace(num_attention_heads=8, hidden_size=512)
    assert c.num_key_value_heads == 8
    c = LLaMAConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).replace(num_attention_heads=8)
    assert c.num_key_value_heads == 2  # an explicit GQA setting is kept


def test_a_config_files_run_time_fields_stick_unless_the_flag_is_given(tmp_path):
    """A json:: config writing scan_query_chunk_size=128 ran at the 1024 default (the original's
    rule). Now each run-time field comes from --update_llama_config, else a --llama.X given on
    the command line, else the file, else the flag default, and the sources say which."""
    from lwm.config import RUNTIME_FIELDS, build_config_with_sources, describe_runtime_fields
    from lwm.flags import define_flags_with_default, parse_flags_for_test

    path = tmp_path / "model.json"
    path.write_text(json.dumps(dict(hidden_size=64, num_attention_heads=4, intermediate_size=96,
                                    num_hidden_layers=2, scan_query_chunk_size=128, scan_key_chunk_size=128,
                                    scan_mlp_chunk_size=256, remat_block="nothing_saveable")))
    spec = f"json::{path}"
    flags, _ = define_flags_with_default(cfgsrc_llama=LLaMAConfig.get_default_config())

    parse_flags_for_test([])  # nothing given: the file's values, the defaults for what it leaves out
    c, sources = build_config_with_sources(spec, flags.cfgsrc_llama, "", explicit=flags.explicit("cfgsrc_llama"))
    assert (c.scan_query_chunk_size, c.scan_key_chunk_size, c.scan_mlp_chunk_size, c.remat_block) == (
        128, 128, 256, "nothing_saveable")
    assert (c.scan_loss_chunk_size, c.attention_impl) == (1024, "auto")
    assert sources["scan_query_chunk_size"] == spec and sources["scan_loss_chunk_size"] == "default"
    assert set(sources) == set(RUNTIME_FIELDS)

    # a flag given explicitly wins over the file, even when it equals the flag default
    parse_flags_for_test(["--cfgsrc_llama.scan_query_chunk_size=1024", "--cfgsrc_llama.remat_block="])
    c, sources = build_config_with_sources(spec, flags.cfgsrc_llama, "dict(scan_mlp_chunk_size=64)",
                                           explicit=flags.explicit("cfgsrc_llama"))
    assert (c.scan_query_chunk_size, c.scan_key_chunk_size, c.scan_mlp_chunk_size, c.remat_block) == (
        1024, 128, 64, "")
    assert (sources["scan_query_chunk_size"], sources["scan_key_chunk_size"], sources["scan_mlp_chunk_size"],
            sources["remat_block"]) == ("--llama.scan_query_chunk_size", spec, "--update_llama_config",
                                        "--llama.remat_block")
    line = describe_runtime_fields(c, sources)
    assert f"scan_key_chunk_size=128 ({spec})" in line and "scan_mlp_chunk_size=64 (--update_llama_config)" in line
    assert "remat_block='' (--llama.remat_block)" in line

    # callers that pass no `explicit` keep the original's rule: all of --llama.* wins
    assert build_config(spec, LLaMAConfig.get_default_config(), "").scan_query_chunk_size == 1024


def test_config_errors_name_the_flag_they_came_from(tmp_path):
    """A refused --update_llama_config (not a literal dict) and a bad --llama.X each say which."""
    with pytest.raises(ValueError, match=r"^--update_llama_config: config updates must be dict\(key=value"):
        build_config("debug", LLaMAConfig.get_default_config(), "__import__('os').system('true')")
    with pytest.raises(ValueError, match=r"^--update_llama_config: scan_mlp_chunk_size must be positive"):
        build_config("debug", LLaMAConfig.get_default_config(), "dict(scan_mlp_chunk_size=0)")
    with pytest.raises(ValueError, match=r"^--llama.scan_mlp_chunk_size: scan_mlp_chunk_size must be positive"):
        build_config("debug", LLaMAConfig.get_default_config(dict(scan_mlp_chunk_size=0)), "")
    with pytest.raises(ValueError, match=r"^--llama.hidden_size: hidden_size=30 is not divisible"):
        build_config("", LLaMAConfig.get_default_config(dict(hidden_size=30, num_attention_heads=4)), "")
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(dict(hidden_size=30, num_attention_heads=4)))
    with pytest.raises(ValueError, match=rf"^--load_llama_config=json::{path}: hidden_size=30 is not divisible"):
        build_config(f"json::{path}", LLaMAConfig.get_default_config(), "")
