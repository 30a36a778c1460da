"""VQGAN: parameter tree (LWM's names), quantizer vs a float64 nearest-neighbour search,
a float64 numpy forward of the whole network, video/chunking/sharding, gradients, checkpoints."""
import os
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwm.vqgan import (VQGAN, VQGANConfig, VQGANModel, VectorQuantizer, load_vqgan_params, param_shapes,
                       save_vqgan_params)

TINY = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2), z_channels=8,
                   num_embeddings=64, quantized_embed_dim=8)
TINY_ATTN = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2), z_channels=8,
                        num_embeddings=64, quantized_embed_dim=8, attn_resolutions=(16,),
                        no_attn_mid_block=False, num_res_blocks=1)


def flatten(tree, prefix=""):
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


# ----------------------------------------------------------------------------- expected tree, from the spec text


def expected_tree(cfg: VQGANConfig) -> dict:
    """Leaf path -> shape from LWM's VQGAN names (docs/vision_data.md), independent of lwm.vqgan."""
    t = {}

    def conv(path, k, cin, cout):
        t[f"{path}/kernel"] = (k, k, cin, cout)
        t[f"{path}/bias"] = (cout,)

    def gn(path, c):
        t[f"{path}/scale"] = (c,)
        t[f"{path}/bias"] = (c,)

    def resnet(path, cin, cout):
        gn(f"{path}/GroupNorm_0", cin)
        conv(f"{path}/Conv_0", 3, cin, cout)
        gn(f"{path}/GroupNorm_1", cout)
        conv(f"{path}/Conv_1", 3, cout, cout)
        if cin != cout:
            conv(f"{path}/Conv_2", 1, cin, cout)

    def attn(path, c):
        gn(f"{path}/GroupNorm_0", c)
        for i in range(4):
            conv(f"{path}/Conv_{i}", 1, c, c)

    def mid(path, c):
        resnet(f"{path}/ResnetBlock_0", c, c)
        resnet(f"{path}/ResnetBlock_1", c, c)
        if not cfg.no_attn_mid_block:
            attn(f"{path}/AttnBlock_0", c)

    widths = [cfg.hidden_channels * m for m in cfg.channel_mult]
    n_levels = len(widths)
    conv("encoder/Conv_0", 3, cfg.num_channels, cfg.hidden_channels)
    c = cfg.hidden_channels
    for i in range(n_levels):
        res = cfg.resolution // 2 ** i
        for j in range(cfg.num_res_blocks):
            resnet(f"encoder/DownsamplingBlock_{i}/ResnetBlock_{j}", c, widths[i])
            c = widths[i]
            if res in cfg.attn_resolutions:
                attn(f"encoder/DownsamplingBlock_{i}/AttnBlock_{j}", c)
        if i != n_levels - 1:
            conv(f"encoder/DownsamplingBlock_{i}/Downsample_0/Conv_0", 3, c, c)
    mid("encoder/MidBlock_0", c)
    gn("encoder/GroupNorm_0", c)
    conv("encoder/Conv_1", 3, c, cfg.z_channels)
    conv("quant_conv", 1, cfg.z_channels, cfg.quantized_embed_dim)
    t["quantize/embeddings"] = (cfg.num_embeddings, cfg.quantized_embed_dim)
    conv("post_quant_conv", 1, cfg.quantized_embed_dim, cfg.z_channels)
    c = widths[-1]
    conv("decoder/Conv_0", 3, cfg.z_channels, c)
    mid("decoder/MidBlock_0", c)
    for k, level in enumerate(reversed(range(n_levels))):  # block k is level n-1-k
        res = cfg.resolution // 2 ** level
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder/UpsamplingBlock_{k}/ResnetBlock_{j}", c, widths[level])
            c = widths[level]
            if res in cfg.attn_resolutions:
                attn(f"decoder/UpsamplingBlock_{k}/AttnBlock_{j}", c)
        if level != 0:
            conv(f"decoder/UpsamplingBlock_{k}/Upsample_0/Conv_0", 3, c, c)
    gn("decoder/GroupNorm_0", c)
    conv("decoder/Conv_1", 3, c, cfg.num_channels)
    return t


def test_default_param_tree_matches_spec():
    got = {k: tuple(v.shape) for k, v in flatten(param_shapes(VQGANConfig())).items()}
    assert got == expected_tree(VQGANConfig())
    # Hand-checked leaves of LWM's released tokenizer (channel_mult (1,2,2,4,6), hidden 128).
    assert got["encoder/Conv_0/kernel"] == (3, 3, 3, 128)
    assert got["encoder/DownsamplingBlock_4/ResnetBlock_0/Conv_2/kernel"] == (1, 1, 512, 768)
    assert "encoder/DownsamplingBlock_4/Downsample_0/Conv_0/kernel" not in got
    assert got["encoder/Conv_1/kernel"] == (3, 3, 768, 64)
    assert got["quantize/embeddings"] == (8192, 64)
    assert got["decoder/Conv_0/kernel"] == (3, 3, 64, 768)
    # UpsamplingBlock_0 is the LAST level (768 wide, upsamples); UpsamplingBlock_4 is level 0.
    assert got["decoder/UpsamplingBlock_0/Upsample_0/Conv_0/kernel"] == (3, 3, 768, 768)
    assert got["decoder/UpsamplingBlock_4/ResnetBlock_0/Conv_0/kernel"] == (3, 3, 256, 128)
    assert "decoder/UpsamplingBlock_4/Upsample_0/Conv_0/kernel" not in got
    assert got["decoder/UpsamplingBlock_0/ResnetBlock_2/Conv_1/kernel"] == (3, 3, 768, 768)
    assert got["decoder/Conv_1/kernel"] == (3, 3, 128, 3)
    assert len(got) == 277


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN], ids=["tiny", "tiny_attn"])
def test_small_param_tree_matches_spec(cfg):
    got = {k: tuple(v.shape) for k, v in flatten(param_shapes(cfg)).items()}
    assert got == expected_tree(cfg)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="hidden_channels = 48 is not divisible by the 32 GroupNorm groups"):
        VQGANConfig(hidden_channels=48)
    with pytest.raises(ValueError, match=r"resolution=100 is not divisible by 2\*\*\(len\(channel_mult\) - 1\) = 16"):
        VQGANConfig(resolution=100)
    with pytest.raises(ValueError, match=r"attn_resolutions=\(24,\): \[24\] match no level"):
        VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 2), attn_resolutions=(24,))
    with pytest.raises(ValueError, match=r"unknown VQGANConfig fields \['hiden_channels'\]"):
        VQGANConfig.from_dict({"resolution": 32, "hiden_channels": 32})
    with pytest.raises(ValueError, match="channel_mult must be a non-empty tuple"):
        VQGANConfig(channel_mult=())
    # JSON gives lists; LWM's ConfigDict carries num_resolutions.
    assert VQGANConfig.from_dict({**TINY.to_dict(), "channel_mult": [1, 2], "num_resolutions": 2}) == TINY


# ----------------------------------------------------------------------------- float64 numpy reference of the network


def np_conv(x, p, stride=1, padding="SAME"):
    kernel, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    kh, kw, _, cout = kernel.shape
    if padding == "SAME":
        x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    n, height, width, _ = x.shape
    oh, ow = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            out += patch @ kernel[i, j]
    return out + bias


def np_groupnorm(x, p, groups=32, eps=1e-6):
    n, height, width, c = x.shape
    g = x.reshape(n, height, width, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(x.shape) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_resnet(x, p):
    h = np_conv(np_silu(np_groupnorm(x, p["GroupNorm_0"])), p["Conv_0"])
    h = np_conv(np_silu(np_groupnorm(h, p["GroupNorm_1"])), p["Conv_1"])
    return (np_conv(x, p["Conv_2"]) if "Conv_2" in p else x) + h


def np_attn(x, p):
    n, height, width, c = x.shape
    h = np_groupnorm(x, p["GroupNorm_0"])
    q, k, v = (np_conv(h, p[f"Conv_{i}"]).reshape(n, -1, c) for i in range(3))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(c)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return x + np_conv((w @ v).reshape(n, height, width, c), p["Conv_3"])


def np_mid(x, p, cfg):
    x = np_resnet(x, p["ResnetBlock_0"])
    if not cfg.no_attn_mid_block:
        x = np_attn(x, p["AttnBlock_0"])
    return np_resnet(x, p["ResnetBlock_1"])


def np_encode_latents(params, x, cfg):
    """pixels [N, R, R, C] -> z after quant_conv [N, r, r, D], float64."""
    p = params["encoder"]
    x = np_conv(np.asarray(x, np.float64), p["Conv_0"])
    for i in range(len(cfg.channel_mult)):
        block = p[f"DownsamplingBlock_{i}"]
        for j in range(cfg.num_res_blocks):
            x = np_resnet(x, block[f"ResnetBlock_{j}"])
            if f"AttnBlock_{j}" in block:
                x = np_attn(x, block[f"AttnBlock_{j}"])
        if "Downsample_0" in block:  # pad bottom/right by one, 3x3 stride 2 VALID
            x = np_conv(np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))), block["Downsample_0"]["Conv_0"], 2, "VALID")
    x = np_mid(x, p["MidBlock_0"], cfg)
    x = np_conv(np_silu(np_groupnorm(x, p["GroupNorm_0"])), p["Conv_1"])
    return np_conv(x, params["quant_conv"])


def np_decode_codes(params, codes, cfg):
    """codes [N, r, r] -> pixels [N, R, R, C] clipped to [-1, 1], float64."""
    p = params["decoder"]
    x = np.asarray(params["quantize"]["embeddings"], np.float64)[codes]
    x = np_conv(np_conv(x, params["post_quant_conv"]), p["Conv_0"])
    x = np_mid(x, p["MidBlock_0"], cfg)
    for k in range(len(cfg.channel_mult)):
        block = p[f"UpsamplingBlock_{k}"]
        for j in range(cfg.num_res_blocks + 1):
            x = np_resnet(x, block[f"ResnetBlock_{j}"])
            if f"AttnBlock_{j}" in block:
                x = np_attn(x, block[f"AttnBlock_{j}"])
        if "Upsample_0" in block:  # nearest x2, then 3x3 conv
            x = np_conv(x.repeat(2, axis=1).repeat(2, axis=2), block["Upsample_0"]["Conv_0"])
    x = np_conv(np_silu(np_groupnorm(x, p["GroupNorm_0"])), p["Conv_1"])
    return np.clip(x, -1.0, 1.0)


def np_nearest_codes(z, embeddings):
    """float64 nearest codebook rows, and the gap to the runner-up (how safe the choice is)."""
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    e = np.asarray(embeddings, np.float64)
    d = ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)  # [M, K]
    order = np.argsort(d, axis=1)
    gap = np.take_along_axis(d, order[:, 1:2], 1)[:, 0] - np.take_along_axis(d, order[:, :1], 1)[:, 0]
    return order[:, 0], gap, d


# ----------------------------------------------------------------------------- fixtures


def random_params(cfg, seed):
    """Random params drawn in numpy from the spec tree (no compile): fan-in scaled kernels,
    non-zero biases and norm affines, a codebook with the latents' scale (the init's tiny
    codebook would make every code a near-tie), and an output conv scaled up so decoding
    exercises the clip to [-1, 1]."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in expected_tree(cfg).items():
        node = params
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        if leaf == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif leaf == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        node[leaf] = value.astype(np.float32)
    x = rng.uniform(-1, 1, (2, cfg.resolution, cfg.resolution, cfg.num_channels))
    z = np_encode_latents(params, x, cfg)
    params["quantize"]["embeddings"] = (rng.standard_normal((cfg.num_embeddings, cfg.quantized_embed_dim))
                                        * z.std() + z.mean()).astype(np.float32)
    params["decoder"]["Conv_1"]["kernel"] *= 10.0
    return params


@pytest.fixture(scope="module")
def tiny_params():
    return random_params(TINY, 0)


@pytest.fixture(scope="module")
def tiny_pixels():
    rng = np.random.default_rng(1)
    return rng.uniform(-1, 1, (2, 3, 32, 32, 3)).astype(np.float32)  # [B, T, H, W, C]


# ----------------------------------------------------------------------------- behaviour


def test_quantizer_codes_are_float64_nearest_neighbours():
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((64, 8)).astype(np.float32)
    z = rng.standard_normal((3, 5, 7, 8)).astype(np.float32)
    quantizer = VectorQuantizer(64, 8)
    quantized, codes = quantizer.apply({"params": {"embeddings": embeddings}}, z)
    ref, gap, _ = np_nearest_codes(z, embeddings)
    assert gap.min() > 1e-3  # the seeded data has no near-ties, so float32 must pick the same rows
    assert codes.dtype == jnp.int32 and codes.shape == (3, 5, 7)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), ref)
    np.testing.assert_allclose(np.asarray(quantized), embeddings[ref].reshape(z.shape), rtol=0, atol=1e-6)
    # straight-through: d quantized / d z is the identity
    grad = jax.grad(lambda zz: jnp.sum(quantizer.apply({"params": {"embeddings": embeddings}}, zz)[0] * 3.0))(z)
    np.testing.assert_allclose(np.asarray(grad), 3.0)


def test_encode_matches_float64_reference(tiny_params, tiny_pixels):
    frames = tiny_pixels[0]  # [3, 32, 32, 3]
    vqgan = VQGAN(tiny_params, TINY)
    quantized, codes = vqgan.encode(frames)
    assert quantized.shape == (3, 16, 16, 8) and codes.shape == (3, 16, 16) and codes.dtype == jnp.int32
    z_ref = np_encode_latents(tiny_params, frames, TINY)
    z = np.asarray(jax.jit(lambda p, v: VQGANModel(TINY).apply({"params": p}, v, method=VQGANModel.encode_latents))(
        tiny_params, frames))
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-4 * np.abs(z_ref).max())
    ref, gap, d = np_nearest_codes(z_ref, tiny_params["quantize"]["embeddings"])
    got = np.asarray(codes).reshape(-1)
    # where the float64 choice is clear-cut the codes agree; elsewhere the chosen row is a tie
    # within the float32 latents' error (|d(z + dz) - d(z)| <= 2 |dz| |z - e| + |dz|^2)
    err = np.abs(z - z_ref).reshape(-1, z.shape[-1])
    slack = 4 * np.linalg.norm(err, axis=1) * np.sqrt(d.max(axis=1)) + 1e-9
    clear = gap > slack
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear], ref[clear])
    chosen = d[np.arange(len(got)), got]
    assert np.all(chosen - d[np.arange(len(got)), ref] <= slack)
    np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 8),
                               tiny_params["quantize"]["embeddings"][got], rtol=0, atol=1e-5)


def test_decode_matches_float64_reference_and_range(tiny_params):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 64, (3, 16, 16)).astype(np.int32)
    vqgan = VQGAN(tiny_params, TINY)
    pixels = np.asarray(vqgan.decode(codes))
    ref = np_decode_codes(tiny_params, codes, TINY)
    assert pixels.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(pixels, ref, rtol=0, atol=2e-4)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert (np.abs(ref) == 1.0).mean() > 0.05  # the scaled output conv makes the clip matter
    # flat codes [N, h*w] and video codes [B, T, h, w] decode to the same frames
    np.testing.assert_array_equal(np.asarray(vqgan.decode(codes.reshape(3, 256))), pixels)
    video = np.asarray(vqgan.decode(codes.reshape(1, 3, 16, 16)))
    assert video.shape == (1, 3, 32, 32, 3)
    np.testing.assert_allclose(video[0], pixels, rtol=0, atol=1e-6)


def test_video_encodes_as_its_frames_across_chunks(tiny_params, tiny_pixels):
    vqgan = VQGAN(tiny_params, TINY, frames_per_chunk=4)  # 6 frames: a full chunk and a padded one
    quantized, codes = vqgan.encode(tiny_pixels)
    assert quantized.shape == (2, 3, 16, 16, 8) and codes.shape == (2, 3, 16, 16)
    images = VQGAN(tiny_params, TINY)  # each clip's 3 frames as a batch of images
    for b in range(2):
        q_b, c_b = images.encode(tiny_pixels[b])
        np.testing.assert_array_equal(np.asarray(codes[b]), np.asarray(c_b))
        np.testing.assert_allclose(np.asarray(quantized[b]), np.asarray(q_b), rtol=0, atol=1e-6)
    # decode(encode(x)) keeps the video layout, in range
    recon = np.asarray(vqgan.decode(codes[:1]))
    assert recon.shape == (1, 3, 32, 32, 3) and recon.min() >= -1 and recon.max() <= 1
    np.testing.assert_allclose(recon[0], np.asarray(images.decode(codes[0])), rtol=0, atol=1e-6)


def test_sharded_over_a_mesh_equals_unsharded(tiny_params, tiny_pixels):
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 1, 2)
    mesh = jax.sharding.Mesh(devices, ("dp", "fsdp", "tp", "sp"))
    sharded = VQGAN(tiny_params, TINY, frames_per_chunk=3, mesh=mesh)
    assert sharded.frames_per_chunk == 8  # rounded up to the device count
    q_s, c_s = sharded.encode(tiny_pixels)  # 6 frames padded to one chunk of 8, 1 frame a device
    images = VQGAN(tiny_params, TINY)
    for b in range(2):
        q_b, c_b = images.encode(tiny_pixels[b])
        np.testing.assert_array_equal(np.asarray(c_s[b]), np.asarray(c_b))
        np.testing.assert_allclose(np.asarray(q_s[b]), np.asarray(q_b), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sharded.decode(c_s[b])), np.asarray(images.decode(c_b)),
                                   rtol=0, atol=1e-5)


def test_attention_configuration_runs_and_gradients_match_finite_differences():
    cfg = TINY_ATTN
    params = random_params(cfg, 3)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    model = VQGANModel(cfg)
    codes = rng.integers(0, cfg.num_embeddings, (2, 16, 16))
    w_z, w_x = rng.standard_normal((2, 16, 16, 8)), rng.standard_normal(x.shape)
    direction = jax.tree.map(lambda a: rng.standard_normal(a.shape), params)
    with jax.enable_x64(True):  # float64 throughout, so finite differences are exact to ~1e-9
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        q64 = jnp.asarray(np.asarray(params["quantize"]["embeddings"], np.float64)[codes])

        def smooth(p):  # encoder and decoder without the (piecewise constant) quantizer
            z = model.apply({"params": p}, x64, method=VQGANModel.encode_latents)
            pixels = model.apply({"params": p}, q64, method=VQGANModel.decode_quantized)
            return jnp.sum(z * w_z) + jnp.sum(pixels * w_x), (z, pixels)

        def training_loss(p):  # the full call: straight-through quantizer and VQ loss
            recon, _, vq_loss = model.apply({"params": p}, x64)
            return jnp.mean((recon - x64) ** 2) + vq_loss

        @jax.jit
        def step(p):  # one compile for everything this test needs
            return jax.value_and_grad(smooth, has_aux=True)(p), jax.grad(training_loss)(p)

        ((_, (z, pixels)), g), train_grads = step(p64)
        # forward of encoder and decoder, attention blocks included, equals the numpy reference
        np.testing.assert_allclose(np.asarray(z), np_encode_latents(params, x, cfg), rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(pixels), np_decode_codes(params, codes, cfg), rtol=0, atol=1e-10)
        # jax.grad of the continuous parts equals central finite differences along a random direction
        analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
        eps = 1e-6
        ((plus, _), _), _ = step(jax.tree.map(lambda a, d: a + eps * d, p64, direction))
        ((minus, _), _), _ = step(jax.tree.map(lambda a, d: a - eps * d, p64, direction))
        numeric = (float(plus) - float(minus)) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
        # the training loss is differentiable end to end: finite, and reaching the attention blocks
        train_grads = flatten(train_grads)
        assert all(np.isfinite(np.asarray(v)).all() for v in train_grads.values())
        for path in ("encoder/DownsamplingBlock_1/AttnBlock_0/Conv_0/kernel",
                     "encoder/MidBlock_0/AttnBlock_0/Conv_3/kernel",
                     "decoder/UpsamplingBlock_0/AttnBlock_1/Conv_1/kernel", "quantize/embeddings"):
            assert np.abs(np.asarray(train_grads[path])).max() > 0, path


def test_init_params_tree_and_codebook_range():
    params = VQGAN.init_params(TINY, jax.random.PRNGKey(0))
    assert {k: tuple(v.shape) for k, v in flatten(params).items()} == expected_tree(TINY)
    e = np.asarray(params["quantize"]["embeddings"])
    assert np.abs(e).max() <= 1 / 64 and abs(e.std() - (2 / 64) / np.sqrt(12)) < 0.1 / 64  # uniform(-1/K, 1/K)
    kernel = np.asarray(params["decoder"]["MidBlock_0"]["ResnetBlock_0"]["Conv_0"]["kernel"])  # fan-in 3*3*64
    assert abs(kernel.std() * np.sqrt(3 * 3 * 64) - 1.0) < 0.05  # LeCun normal
    assert np.all(np.asarray(params["encoder"]["GroupNorm_0"]["scale"]) == 1.0)
    assert np.all(np.asarray(params["encoder"]["Conv_0"]["bias"]) == 0.0)


def test_checkpoint_round_trip_and_mismatch_errors(tiny_params, tmp_path):
    path = tmp_path / "vqgan.pkl"
    save_vqgan_params(str(path), tiny_params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqgan.pkl"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any new file, not mkstemp's 0600
    loaded = load_vqgan_params(str(path), TINY)
    assert set(flatten(loaded)) == set(flatten(tiny_params))
    for k, v in flatten(tiny_params).items():
        np.testing.assert_array_equal(flatten(loaded)[k], v)
    # a tree wrapped in {'params': ...} (as flax init returns it) loads too
    with open(tmp_path / "wrapped.pkl", "wb") as f:
        pickle.dump({"params": tiny_params}, f)
    assert set(flatten(load_vqgan_params(str(tmp_path / "wrapped.pkl"), TINY))) == set(flatten(tiny_params))
    # VQGAN(path) encodes like VQGAN(params)
    frames = np.random.default_rng(5).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(VQGAN(str(path), TINY).encode(frames)[1]),
                                  np.asarray(VQGAN(tiny_params, TINY).encode(frames)[1]))

    broken = jax.tree.map(lambda a: a, tiny_params)
    del broken["quantize"]["embeddings"]
    broken["encoder"]["Extra_0"] = {"kernel": np.zeros((1, 1, 2, 2), np.float32)}
    broken["decoder"]["Conv_1"]["kernel"] = np.zeros((3, 3, 32, 4), np.float32)
    bad_path = tmp_path / "broken.pkl"
    save_vqgan_params(str(bad_path), broken)
    with pytest.raises(ValueError) as err:
        load_vqgan_params(str(bad_path), TINY)
    msg = str(err.value)
    assert str(bad_path) in msg
    assert "missing leaf quantize/embeddings: expected shape (64, 8)" in msg
    assert "unexpected leaf encoder/Extra_0/kernel: shape (1, 1, 2, 2)" in msg
    assert "mis-shaped leaf decoder/Conv_1/kernel: expected (3, 3, 32, 3) got (3, 3, 32, 4)" in msg
    # the right file against the wrong config (every leaf differs): one line, a few examples, the fix
    with pytest.raises(ValueError) as err:
        VQGAN(str(path), VQGANConfig())
    msg = str(err.value)
    assert "\n" not in msg and msg.count("leaf ") == 4 and "pass --vqgan_config" in msg
    assert re.search(r"\(\d+ missing, \d+ mis-shaped leaves; e\.g\. mis-shaped leaf decoder/", msg), msg
    with pytest.raises(FileNotFoundError, match="does-not-exist.pkl"):
        load_vqgan_params(str(tmp_path / "does-not-exist.pkl"), TINY)


def test_bad_inputs_raise_clear_errors(tiny_params):
    vqgan = VQGAN(tiny_params, TINY)
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\].*got shape \(1, 64, 64, 3\)"):
        vqgan.encode(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="got shape \\(32, 32, 3\\)"):
        vqgan.encode(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="must be float in \\[-1, 1\\], got dtype uint8"):
        vqgan.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="1 codes outside \\[0, 64\\), e.g. \\[64\\]"):
        vqgan.decode(np.where(np.arange(256).reshape(1, 16, 16) == 0, 64, 3).astype(np.int32))
    with pytest.raises(ValueError, match="codes must be \\[..., 16, 16\\] or \\[..., 256\\]"):
        vqgan.decode(np.zeros((1, 8, 8), np.int32))
