"""The VQGAN image tokenizer: 256x256 RGB frames <-> 16x16 grids of codes in [0, 8192).

Architecture and parameter names follow LWM's released VQGAN (docs/vision_data.md, "The VQGAN checkpoint"), so its
pickled params load unchanged:

    from lwm.vqgan import VQGAN
    vqgan = VQGAN("vqgan.pkl")                  # the released checkpoint, default config
    quantized, codes = vqgan.encode(frames)     # [T, 256, 256, 3] in [-1, 1] -> codes [T, 16, 16]
    frames = vqgan.decode(codes)                # -> [T, 256, 256, 3] in [-1, 1]

Videos [B, T, H, W, C] are coded frame by frame; long inputs are cut into chunks of
`frames_per_chunk` frames so device memory stays bounded whatever the length.
The pure flax form is `VQGANModel(config).apply({'params': p}, x, method='encode')`.
The checkpoint and a config file may be in a bucket (`VQGAN("gs://bucket/vqgan.pkl")`, through `lwm.storage`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from tqdm.auto import tqdm

from lwm import storage
from lwm.checkpoint import AtomicWriter

GROUPNORM_GROUPS = 32  # flax nn.GroupNorm's default, the one LWM's weights were trained with


def vqgan_config_file(text_or_path: str) -> str:
    """The file a `--vqgan_config` value names ('' for LWM's config or a JSON object string)."""
    return "" if not text_or_path or text_or_path.lstrip().startswith("{") else text_or_path


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """VQGAN hyper-parameters; the defaults are LWM's released tokenizer."""

    resolution: int = 256  # input frames are resolution x resolution pixels
    num_channels: int = 3  # pixel channels (RGB)
    hidden_channels: int = 128  # channels after the first conv; level i has hidden * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)  # one entry per resolution level
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature-map sizes that get an attention block
    no_attn_mid_block: bool = True  # True: the MidBlocks have no attention block
    z_channels: int = 64  # encoder output / decoder input channels
    num_embeddings: int = 8192  # codebook size: codes are in [0, num_embeddings)
    quantized_embed_dim: int = 64  # width of a codebook row
    dropout: float = 0.0  # dropout inside ResnetBlocks (only when deterministic=False)
    resample_with_conv: bool = True  # strided / post-resize convs (False: avg-pool / plain resize)
    commitment_cost: float = 0.25  # beta of the VQ loss ||z - sg(e)||^2 term (training only)

    def __post_init__(self):
        # JSON gives lists; keep tuples so the config stays hashable (flax module attribute).
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("resolution", "num_channels", "hidden_channels", "z_channels",
                     "num_embeddings", "quantized_embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"VQGANConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_res_blocks, (int, np.integer)) or self.num_res_blocks < 0:
            raise ValueError(f"VQGANConfig.num_res_blocks must be an integer >= 0, got {self.num_res_blocks!r}")
        if not self.channel_mult or any(not isinstance(m, (int, np.integer)) or m <= 0 for m in self.channel_mult):
            raise ValueError(f"VQGANConfig.channel_mult must be a non-empty tuple of positive integers, "
                             f"got {self.channel_mult!r}")
        factor = 2 ** (self.num_resolutions - 1)
        if self.resolution % factor:
            raise ValueError(f"VQGANConfig.resolution={self.resolution} is not divisible by "
                             f"2**(len(channel_mult) - 1) = {factor} (one downsampling per level but the last)")
        widths = {"hidden_channels": self.hidden_channels}
        widths.update({f"hidden_channels * channel_mult[{i}]": self.hidden_channels * m
                       for i, m in enumerate(self.channel_mult)})
        for what, width in widths.items():
            if width % GROUPNORM_GROUPS:
                raise ValueError(f"VQGANConfig: {what} = {width} is not divisible by the "
                                 f"{GROUPNORM_GROUPS} GroupNorm groups")
        levels = self.level_resolutions
        unused = [r for r in self.attn_resolutions if r not in levels]
        if unused:
            raise ValueError(f"VQGANConfig.attn_resolutions={self.attn_resolutions}: {unused} match no level; "
                             f"the feature-map sizes are {levels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQGANConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.commitment_cost < 0:
            raise ValueError(f"VQGANConfig.commitment_cost must be >= 0, got {self.commitment_cost!r}")

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level, e.g. (256, 128, 64, 32, 16) for the default."""
        return tuple(self.resolution // 2 ** i for i in range(self.num_resolutions))

    @property
    def latent_size(self) -> int:
        """Side of the code grid: 16 for the default config."""
        return self.level_resolutions[-1]

    @property
    def tokens_per_frame(self) -> int:
        return self.latent_size ** 2

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VQGANConfig":
        """Build from a dict (JSON); unknown keys are an error. `num_resolutions`, which
        LWM's ConfigDict carries, is accepted when it agrees with channel_mult."""
        values = dict(values)
        num_resolutions = values.pop("num_resolutions", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields {unknown}; known fields: {sorted(known)}")
        config = cls(**values)
        if num_resolutions is not None and num_resolutions != config.num_resolutions:
            raise ValueError(f"num_resolutions={num_resolutions} disagrees with "
                             f"len(channel_mult)={config.num_resolutions}")
        return config

    @classmethod
    def from_json(cls, text_or_path: str) -> "VQGANConfig":
        """'' -> defaults; a JSON object string; or the path of a JSON file."""
        if not text_or_path:
            return cls()
        if not vqgan_config_file(text_or_path):
            return cls.from_dict(json.loads(text_or_path))
        try:
            values = json.loads(storage.read_text(text_or_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{text_or_path}: not valid JSON ({e})") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- modules
# Class names matter: flax names submodules `<ClassName>_<k>` in creation order, and those
# names are the checkpoint's keys.


class ResnetBlock(nn.Module):
    """x + conv(silu(gn(conv(silu(gn(x)))))); a 1x1 `Conv_2` shortcut when widths differ."""

    out_channels: int | None = None
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # x: [N, H, W, C_in]
        out_channels = self.out_channels or x.shape[-1]
        h = nn.Conv(out_channels, (3, 3))(nn.silu(nn.GroupNorm(num_groups=GROUPNORM_GROUPS)(x)))
        h = nn.silu(nn.GroupNorm(num_groups=GROUPNORM_GROUPS)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = nn.Conv(out_channels, (3, 3))(h)
        if out_channels != x.shape[-1]:
            x = nn.Conv(out_channels, (1, 1))(x)
        return x + h  # [N, H, W, C_out]


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    Params: GroupNorm_0, Conv_0/1/2 (1x1 q, k, v), Conv_3 (1x1 output projection).
    The projection runs on the [N, H, W, C] map: LWM's version applied it to the flattened
    [N, H*W, C] tensor and then failed adding the residual.
    """

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, C]
        n, height, width, c = x.shape
        h = nn.GroupNorm(num_groups=GROUPNORM_GROUPS)(x)
        q, k, v = (nn.Conv(c, (1, 1))(h).reshape(n, height * width, c) for _ in range(3))  # [N, HW, C]
        weights = jnp.einsum("nqc,nkc->nqk", q, k) * c ** -0.5
        # softmax in at least float32 (bf16 activations would lose the small weights)
        weights = jax.nn.softmax(weights.astype(jnp.promote_types(v.dtype, jnp.float32)), axis=-1).astype(v.dtype)
        h = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(n, height, width, c)
        return x + nn.Conv(c, (1, 1))(h)


class Downsample(nn.Module):
    """Halve H and W: pad bottom/right by one pixel then a 3x3 stride-2 VALID conv (or 2x2 avg-pool)."""

    with_conv: bool

    @nn.compact
    def __call__(self, x):  # [N, H, W, C] -> [N, H/2, W/2, C]
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID")(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv (when with_conv)."""

    with_conv: bool

    @nn.compact
    def __call__(self, x):  # [N, H, W, C] -> [N, 2H, 2W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3))(x) if self.with_conv else x


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock (unless config.no_attn_mid_block), ResnetBlock; width unchanged."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = ResnetBlock(dropout=self.config.dropout)(x, deterministic)
        if not self.config.no_attn_mid_block:
            x = AttnBlock()(x)
        return ResnetBlock(dropout=self.config.dropout)(x, deterministic)


class DownsamplingBlock(nn.Module):
    """Encoder level `level`: num_res_blocks ResnetBlocks (+ attention), then Downsample but at the last level."""

    config: VQGANConfig
    level: int

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        width = cfg.hidden_channels * cfg.channel_mult[self.level]
        for _ in range(cfg.num_res_blocks):
            x = ResnetBlock(width, dropout=cfg.dropout)(x, deterministic)
            if cfg.level_resolutions[self.level] in cfg.attn_resolutions:
                x = AttnBlock()(x)
        if self.level != cfg.num_resolutions - 1:
            x = Downsample(cfg.resample_with_conv)(x)
        return x


class UpsamplingBlock(nn.Module):
    """Decoder level `level`: num_res_blocks + 1 ResnetBlocks (+ attention), then Upsample but at level 0."""

    config: VQGANConfig
    level: int

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        width = cfg.hidden_channels * cfg.channel_mult[self.level]
        for _ in range(cfg.num_res_blocks + 1):
            x = ResnetBlock(width, dropout=cfg.dropout)(x, deterministic)
            if cfg.level_resolutions[self.level] in cfg.attn_resolutions:
                x = AttnBlock()(x)
        if self.level != 0:
            x = Upsample(cfg.resample_with_conv)(x)
        return x


class Encoder(nn.Module):
    """[N, R, R, num_channels] pixels -> [N, r, r, z_channels] latents (r = latent_size)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        cfg = self.config
        x = nn.Conv(cfg.hidden_channels, (3, 3))(pixels)  # Conv_0
        for level in range(cfg.num_resolutions):
            x = DownsamplingBlock(cfg, level)(x, deterministic)
        x = MidBlock(cfg)(x, deterministic)
        x = nn.silu(nn.GroupNorm(num_groups=GROUPNORM_GROUPS)(x))
        return nn.Conv(cfg.z_channels, (3, 3))(x)  # Conv_1


class Decoder(nn.Module):
    """[N, r, r, z_channels] latents -> [N, R, R, num_channels] pixels (not clipped here)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        cfg = self.config
        x = nn.Conv(cfg.hidden_channels * cfg.channel_mult[-1], (3, 3))(z)  # Conv_0
        x = MidBlock(cfg)(x, deterministic)
        # Created from the last level down: UpsamplingBlock_0 is the LAST (coarsest) level.
        for level in reversed(range(cfg.num_resolutions)):
            x = UpsamplingBlock(cfg, level)(x, deterministic)
        x = nn.silu(nn.GroupNorm(num_groups=GROUPNORM_GROUPS)(x))
        return nn.Conv(cfg.num_channels, (3, 3))(x)  # Conv_1


class VectorQuantizer(nn.Module):
    """Nearest codebook row, with a straight-through gradient (van den Oord et al. 2017)."""

    num_embeddings: int
    embed_dim: int

    def setup(self):
        n = self.num_embeddings
        self.embeddings = self.param(
            "embeddings",
            lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -1.0 / n, 1.0 / n),
            (n, self.embed_dim), jnp.float32)

    def __call__(self, z):  # z: [..., D] -> (quantized [..., D], codes [...] int32)
        flat = z.reshape(-1, z.shape[-1])  # [M, D]
        e = self.embeddings  # [K, D]
        hi = jax.lax.Precision.HIGHEST  # true float32 dot products: TPU/GPU default to bf16/tf32
        distances = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(e ** 2, axis=1)[None, :]
                     - 2.0 * jnp.dot(flat, e.T, precision=hi))  # [M, K]
        codes = jnp.argmin(distances, axis=1).astype(jnp.int32).reshape(z.shape[:-1])
        quantized = self.lookup(codes)
        return z + jax.lax.stop_gradient(quantized - z), codes

    def lookup(self, codes):  # codes [...] int -> [..., D]
        return jnp.take(self.embeddings, codes, axis=0)


class VQGANModel(nn.Module):
    """Encoder, quant_conv, quantizer, post_quant_conv, decoder; frames are coded independently.

    Methods take images [N, H, W, C] or videos [B, T, H, W, C] (codes [N, h, w] or [B, T, h, w]).
    """

    config: VQGANConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.quantized_embed_dim)
        self.quant_conv = nn.Conv(cfg.quantized_embed_dim, (1, 1))
        self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))

    def encode_latents(self, pixels, deterministic: bool = True):
        """Continuous latents before quantization: [..., H, W, C] -> [..., h, w, quantized_embed_dim]."""
        check_pixels_shape(pixels.shape, self.config)
        lead = pixels.shape[:-3]
        frames = pixels.reshape(-1, *pixels.shape[-3:])  # [N, H, W, C]
        z = self.quant_conv(self.encoder(frames, deterministic))
        return z.reshape(*lead, *z.shape[1:])

    def encode(self, pixels, deterministic: bool = True):
        """-> (quantized [..., h, w, quantized_embed_dim], codes [..., h, w] int32)."""
        return self.quantize(self.encode_latents(pixels, deterministic))

    def decode(self, codes, deterministic: bool = True):
        """codes [..., h, w] -> pixels [..., H, W, C] clipped to [-1, 1]."""
        return self.decode_quantized(self.quantize.lookup(codes), deterministic)

    def decode_quantized(self, quantized, deterministic: bool = True):
        """quantized [..., h, w, D] -> pixels [..., H, W, C] clipped to [-1, 1]."""
        lead = quantized.shape[:-3]
        flat = quantized.reshape(-1, *quantized.shape[-3:])
        pixels = self.decoder(self.post_quant_conv(flat), deterministic)
        return jnp.clip(pixels, -1.0, 1.0).reshape(*lead, *pixels.shape[1:])

    def __call__(self, pixels, deterministic: bool = True):
        """Reconstruction and VQ loss for training: -> (pixels, codes, vq_loss).

        vq_loss = mean((sg(z) - e)^2) + commitment_cost * mean((z - sg(e))^2).
        """
        z = self.encode_latents(pixels, deterministic)
        quantized, codes = self.quantize(z)
        e = self.quantize.lookup(codes)
        vq_loss = (jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
                   + self.config.commitment_cost * jnp.mean((z - jax.lax.stop_gradient(e)) ** 2))
        return self.decode_quantized(quantized, deterministic), codes, vq_loss


def check_pixels_shape(shape, config: VQGANConfig) -> None:
    """Raise a ValueError naming the problem unless shape is [N,R,R,C] or [B,T,R,R,C]."""
    r, c = config.resolution, config.num_channels
    if len(shape) not in (4, 5) or tuple(shape[-3:]) != (r, r, c):
        raise ValueError(f"VQGAN pixels must be [batch, {r}, {r}, {c}] or [batch, time, {r}, {r}, {c}] "
                         f"(resolution={r}, num_channels={c}), got shape {tuple(shape)}")


# ----------------------------------------------------------------------------- params I/O


def param_shapes(config: VQGANConfig) -> dict:
    """The params tree of `config` as jax.ShapeDtypeStruct leaves (no compute)."""
    model = VQGANModel(config)
    pixels = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.num_channels), jnp.float32)
    variables = jax.eval_shape(lambda rng, x: model.init(rng, x), jax.random.PRNGKey(0), pixels)
    return unfreeze(variables["params"])


@functools.lru_cache(maxsize=None)
def _leaf_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in _flatten(param_shapes(config)).items()}


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def check_params_tree(params: Mapping, config: VQGANConfig, source: str = "params") -> None:
    """Raise a one-line ValueError counting missing, unexpected and mis-shaped leaves, naming a few."""
    expected = _leaf_shapes(config)
    got = _flatten(params)
    missing = [f"missing leaf {k}: expected shape {expected[k]}" for k in sorted(set(expected) - set(got))]
    unexpected = [f"unexpected leaf {k}: shape {tuple(np.shape(got[k]))}" for k in sorted(set(got) - set(expected))]
    misshaped = [f"mis-shaped leaf {k}: expected {expected[k]} got {tuple(np.shape(got[k]))}"
                 for k in sorted(set(expected) & set(got)) if tuple(np.shape(got[k])) != expected[k]]
    if not (missing or unexpected or misshaped):
        return
    counts = ", ".join(f"{len(v)} {name}" for name, v in
                       (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v)
    # A released-VQGAN-sized config against a tiny checkpoint mismatches every leaf: name a few.
    examples = "; ".join((misshaped[:2] + missing[:2] + unexpected[:2])[:4])
    raise ValueError(f"{source}: VQGAN params do not match the config ({counts} leaves; e.g. {examples}); "
                     "a VQGAN other than LWM's needs its config: pass --vqgan_config (a JSON file or string of "
                     "VQGANConfig fields)")


def _as_plain_dict(tree) -> dict:
    tree = unfreeze(tree) if not isinstance(tree, dict) else tree
    return {k: _as_plain_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def load_vqgan_params(path: str, config: VQGANConfig = VQGANConfig()) -> dict:
    """Read a pickled params dict (LWM's VQGAN checkpoint format) and check it against config.

    A tree wrapped as {'params': {...}} is unwrapped. Leaves come back as numpy arrays.
    """
    if not storage.isfile(path):
        raise FileNotFoundError(f"VQGAN checkpoint {path!r} does not exist")
    data = storage.read_bytes(path)  # read first: a bucket's read error is an OSError, not a bad pickle
    try:
        params = pickle.loads(data)
    except Exception as e:  # noqa: BLE001 (pickle raises many types on a bad file)
        raise ValueError(f"{path}: not a readable pickle of VQGAN params ({type(e).__name__}: {e})") from e
    if not isinstance(params, Mapping):
        raise ValueError(f"{path}: expected a pickled dict of params, got {type(params).__name__}")
    params = _as_plain_dict(params)
    if set(params) == {"params"}:
        params = params["params"]
    params = jax.tree.map(np.asarray, params)
    check_params_tree(params, config, source=path)
    return params


def save_vqgan_params(path: str, params: Mapping) -> None:
    """Pickle params (numpy leaves, no outer 'params' key) atomically: temp file then rename, or
    one object upload to a bucket URL."""
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), _as_plain_dict(params))
    with AtomicWriter(path) as f:
        pickle.dump(params, f, protocol=pickle.HIGHEST_PROTOCOL)


# ----------------------------------------------------------------------------- the tokenizer


@functools.lru_cache(maxsize=None)
def _jitted_method(config: VQGANConfig, method: str, frames_sharding=None):
    """One jitted `VQGANModel.<method>(params, frames)` per config (and sharding), shared by every
    VQGAN instance so a second tokenizer with the same config reuses the compiled code."""
    model = VQGANModel(config)

    def fn(params, frames):
        return model.apply({"params": params}, frames, method=getattr(VQGANModel, method))

    if frames_sharding is None:
        return jax.jit(fn)
    replicated = jax.sharding.NamedSharding(frames_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, in_shardings=(replicated, frames_sharding), out_shardings=frames_sharding)


# A standard normal truncated to [-2, 2] has std 0.8796; dividing by it restores unit variance
# (the constant flax's variance_scaling initialiser uses).
_TRUNCATED_NORMAL_STD = 1.0 / 0.87962566103423978


def _truncated_normal(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normal samples redrawn until they fall in [-2, 2]."""
    out = rng.standard_normal(shape)
    outside = np.abs(out) > 2
    while outside.any():
        out[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(out) > 2
    return out


class VQGAN:
    """Jitted encode/decode with bounded memory: frames go through in chunks of `frames_per_chunk`.

    With a mesh, each chunk's frames are sharded over every mesh axis (the chunk is rounded up
    to a multiple of the device count) and the params are replicated.

    >>> vqgan = VQGAN(VQGAN.init_params(cfg, jax.random.PRNGKey(0)), cfg)     # doctest: +SKIP
    >>> quantized, codes = vqgan.encode(video)  # [1, 20, 256, 256, 3] -> codes [1, 20, 16, 16]
    """

    def __init__(self, params_or_path, config: VQGANConfig = VQGANConfig(), frames_per_chunk: int = 16,
                 mesh: jax.sharding.Mesh | None = None):
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        self.config = config
        self.model = VQGANModel(config)
        self.mesh = mesh
        if isinstance(params_or_path, (str, os.PathLike)):
            params = load_vqgan_params(os.fspath(params_or_path), config)
        else:
            params = _as_plain_dict(params_or_path)
            check_params_tree(params, config)
        n_devices = 1 if mesh is None else mesh.size
        self.frames_per_chunk = -(-frames_per_chunk // n_devices) * n_devices
        if mesh is None:
            self._frames_sharding = None
            self.params = jax.device_put(params)
        else:
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._frames_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
            self.params = jax.device_put(params, replicated)
        self._encode_fn = _jitted_method(config, "encode", self._frames_sharding)
        self._decode_fn = _jitted_method(config, "decode", self._frames_sharding)

    @staticmethod
    def init_params(config: VQGANConfig, rng: jax.Array) -> dict:
        """Random params with the checkpoint's tree (for tests and demos), as numpy arrays.

        Drawn leaf by leaf on the host (no forward pass to compile) with flax's default
        initialisers: LeCun normal kernels (truncated at 2 sigma, std 1/sqrt(fan_in)), zero
        biases, unit GroupNorm scales, and a codebook uniform in +-1/num_embeddings.
        """
        host_rng = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
        k = config.num_embeddings
        params: dict = {}
        for path, shape in sorted(_leaf_shapes(config).items()):
            *parents, leaf = path.split("/")
            node = params
            for name in parents:
                node = node.setdefault(name, {})
            if leaf == "kernel":
                node[leaf] = _truncated_normal(host_rng, shape) * (_TRUNCATED_NORMAL_STD / np.sqrt(np.prod(shape[:-1])))
            elif leaf == "embeddings":
                node[leaf] = host_rng.uniform(-1.0 / k, 1.0 / k, shape)
            else:  # conv / GroupNorm biases are zeros, GroupNorm scales ones
                node[leaf] = np.full(shape, 1.0 if leaf == "scale" else 0.0)
            node[leaf] = node[leaf].astype(np.float32)
        return params

    def _run_chunked(self, fn, frames, n_outputs: int, progress: bool | None, desc: str):
        """Apply fn(params, chunk) over frames [N, ...] in fixed-size chunks (padded, so one compile)."""
        n = frames.shape[0]
        if n == 0:
            raise ValueError(f"VQGAN.{desc}: got zero frames")
        n_devices = 1 if self.mesh is None else self.mesh.size
        chunk = min(self.frames_per_chunk, -(-n // n_devices) * n_devices)
        starts = range(0, n, chunk)
        show = len(starts) > 1 if progress is None else progress
        outputs = [[] for _ in range(n_outputs)]
        for start in tqdm(starts, desc=f"VQGAN {desc}", unit="chunk", disable=not show):
            part = frames[start:start + chunk]
            valid = part.shape[0]
            if valid < chunk:  # pad the tail so every call has the compiled shape
                pad = [(0, chunk - valid)] + [(0, 0)] * (part.ndim - 1)
                part = np.pad(np.asarray(part), pad) if isinstance(part, np.ndarray) else jnp.pad(part, pad)
            if self._frames_sharding is not None:
                part = jax.device_put(part, self._frames_sharding)
            result = fn(self.params, part)
            result = result if isinstance(result, tuple) else (result,)
            for out, r in zip(outputs, result):
                r = r[:valid]
                # Several chunks: move each to host so device memory holds one chunk at a time.
                out.append(r if len(starts) == 1 else np.asarray(jax.device_get(r)))
        if len(starts) == 1:
            return tuple(out[0] for out in outputs)
        return tuple(jnp.asarray(np.concatenate(out, axis=0)) for out in outputs)

    def encode(self, pixels, progress: bool | None = None) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, C] or [B, T, H, W, C], float in [-1, 1]
        -> (quantized [..., h, w, quantized_embed_dim] float32, codes [..., h, w] int32)."""
        pixels = pixels if hasattr(pixels, "dtype") else np.asarray(pixels, np.float32)
        check_pixels_shape(np.shape(pixels), self.config)
        if not jnp.issubdtype(pixels.dtype, jnp.floating):
            raise ValueError(f"VQGAN.encode: pixels must be float in [-1, 1], got dtype {pixels.dtype} "
                             f"(scale uint8 with x / 127.5 - 1)")
        lead = pixels.shape[:-3]
        frames = pixels.reshape(-1, *pixels.shape[-3:])  # [N, H, W, C]
        quantized, codes = self._run_chunked(self._encode_fn, frames, 2, progress, "encode")
        return quantized.reshape(*lead, *quantized.shape[1:]), codes.reshape(*lead, *codes.shape[1:])

    def decode(self, codes, progress: bool | None = None) -> jax.Array:
        """codes [B, h, w], [B, T, h, w], or flat [B, h*w] / [B, T, h*w] -> pixels [..., H, W, C] in [-1, 1]."""
        side, k = self.config.latent_size, self.config.num_embeddings
        codes = codes if hasattr(codes, "dtype") else np.asarray(codes)
        shape = tuple(np.shape(codes))
        if len(shape) >= 3 and shape[-2:] == (side, side):
            lead = shape[:-2]
        elif len(shape) >= 2 and shape[-1] == side * side:
            lead = shape[:-1]
        else:
            raise ValueError(f"VQGAN.decode: codes must be [..., {side}, {side}] or [..., {side * side}] "
                             f"with a batch axis, got shape {shape}")
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"VQGAN.decode: codes must be integers, got dtype {codes.dtype}")
        host_codes = np.asarray(jax.device_get(codes))
        bad = (host_codes < 0) | (host_codes >= k)
        if bad.any():
            raise ValueError(f"VQGAN.decode: {int(bad.sum())} codes outside [0, {k}), e.g. {host_codes[bad][:5].tolist()}")
        frames = host_codes.reshape(-1, side, side).astype(np.int32)  # [N, h, w]
        (pixels,) = self._run_chunked(self._decode_fn, frames, 1, progress, "decode")
        return pixels.reshape(*lead, *pixels.shape[1:])
