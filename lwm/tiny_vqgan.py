"""A small VQGAN fitted to a set of frames on a CPU, for tiny worlds (lwm/synthetic_vision.py).

No pretrained VQGAN can be downloaded here, so the vision study fits its own: the project's
VQGAN architecture at a small configuration (frames read at 32 x 32 -> 4 x 4 codes), the codebook
initialised by k-means of the random encoder's outputs, then encoder, codebook and decoder
trained together on reconstruction (mean squared error) plus the VQ loss. A real run uses the
released LWM VQGAN (256 x 256 -> 16 x 16 codes of 8192) instead.

    config = TINY_CONFIG
    params, history = fit_vqgan(frames, config, steps=600)   # frames uint8 [N, 64, 64, 3]
    save_vqgan_params("vqgan.pkl", params); storage.write_text("vqgan.json", json.dumps(config.to_dict()))
    code_agreement(VQGAN(params, config), frames_a, frames_b)  # fraction of equal codes per pair
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lwm.vqgan import VQGAN, VQGANConfig, VQGANModel

# Frames read at 32 x 32, four levels (three halvings) -> 4 x 4 = 16 codes a frame, 128 codes.
# Measured on the synthetic world (800 steps, 250 s on 2 cores): reconstructions classify 100%
# by colour, shape and position; 45 codes in use.
TINY_CONFIG = VQGANConfig(resolution=32, hidden_channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1,
                          z_channels=32, num_embeddings=128, quantized_embed_dim=16)


def to_pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1], as lwm.vision_io reads frames."""
    return np.asarray(frames, np.float32) / 127.5 - 1.0


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """[k, D] centres of `points` [M, D] (k-means++ seeding, Lloyd's steps; empty clusters re-seeded)."""
    points = np.asarray(points, np.float64)
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = np.min(((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(points[rng.choice(len(points), p=d2 / d2.sum())] if d2.sum() > 0 else
                       points[rng.integers(len(points))])
    centres = np.asarray(centres)
    for _ in range(iterations):
        nearest = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        for j in range(k):
            members = points[nearest == j]
            centres[j] = members.mean(0) if len(members) else points[rng.integers(len(points))]
    return centres.astype(np.float32)


def fit_vqgan(frames: np.ndarray, config: VQGANConfig = TINY_CONFIG, steps: int = 600, batch_size: int = 32,
              learning_rate: float = 2e-3, seed: int = 0, kmeans_points: int = 4096, restart_every: int = 0,
              progress: bool = True) -> tuple[dict, list[dict]]:
    """(params, history) of a VQGAN fitted to `frames` (uint8 [N, H, W, 3] at config.resolution).

    restart_every > 0: every that many steps, each code no frame of those steps used restarts at
    a latent of the current batch that its code fits worst (dead codes come back where the
    codebook is coarsest), until the last fifth of the fit.
    history: (step, mse, vq_loss, codes_used) every 50 steps (every steps/5 for short fits).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (config.resolution, config.resolution, 3):
        raise ValueError(f"frames must be [N, {config.resolution}, {config.resolution}, 3], got {frames.shape}")
    rng = np.random.default_rng(seed)
    model = VQGANModel(config)
    params = VQGAN.init_params(config, jax.random.key(seed))

    # The codebook starts at k-means centres of the random encoder's latents: every code in use.
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_latents))
    sample = frames[rng.choice(len(frames), min(len(frames), max(64, kmeans_points // config.tokens_per_frame)),
                               replace=False)]
    latents = np.concatenate([np.asarray(encode(params, to_pixels(sample[i:i + 64])))
                              for i in range(0, len(sample), 64)]).reshape(-1, config.quantized_embed_dim)
    latents = latents[rng.choice(len(latents), min(len(latents), kmeans_points), replace=False)]
    params["quantize"]["embeddings"] = kmeans(latents, config.num_embeddings, rng)

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))
    opt_state = optimizer.init(params)

    def loss_fn(p, x):
        recon, codes, vq_loss = model.apply({"params": p}, x)
        mse = jnp.mean((recon - x) ** 2)
        return mse + vq_loss, (mse, vq_loss, codes)

    @jax.jit
    def step(p, state, x):
        (_, (mse, vq_loss, codes)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, mse, vq_loss, codes

    history, every = [], max(1, min(50, steps // 5))
    used = np.zeros(config.num_embeddings, bool)
    window = np.zeros(config.num_embeddings, bool)  # codes used since the last restart
    for i in tqdm(range(steps), desc="fit vqgan", disable=not progress):
        batch = to_pixels(frames[rng.integers(len(frames), size=batch_size)])
        params, opt_state, mse, vq_loss, codes = step(params, opt_state, batch)
        seen = np.unique(np.asarray(codes))
        used[seen] = window[seen] = True
        if restart_every and (i + 1) % restart_every == 0 and i + 1 < steps * 4 // 5:
            params = restart_dead_codes(params, ~window, np.asarray(encode(params, batch)), rng)
            window[:] = False
        if (i + 1) % every == 0 or i + 1 == steps:
            history.append(dict(step=i + 1, mse=float(mse), vq_loss=float(vq_loss), codes_used=int(used.sum())))
            used[:] = False
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params), history


def restart_dead_codes(params: dict, dead: np.ndarray, latents: np.ndarray, rng: np.random.Generator) -> dict:
    """params with the codebook rows `dead` (bool [K]) moved to the latents (of [..., D]) farthest
    from their nearest code, one latent each (the optimizer's moments of those rows stay)."""
    if not dead.any():
        return params
    book = np.array(params["quantize"]["embeddings"])
    flat = latents.reshape(-1, book.shape[1])
    distance = ((flat[:, None, :] - book[None]) ** 2).sum(-1).min(axis=1)
    worst = np.argsort(-distance)[:int(dead.sum())]
    if len(worst) < dead.sum():  # fewer latents than dead codes: the rest at random latents
        worst = np.concatenate([worst, rng.integers(len(flat), size=int(dead.sum()) - len(worst))])
    book[np.flatnonzero(dead)] = flat[worst]
    return {**params, "quantize": {**params["quantize"], "embeddings": jnp.asarray(book)}}


def code_agreement(vqgan: VQGAN, frames_a: np.ndarray, frames_b: np.ndarray, objects_only: bool = True) -> float:
    """Mean fraction of equal codes between frames_a[i] and frames_b[i] (uint8 [N, H, W, 3] each).

    objects_only: count only the code cells where either frame draws something (a cell's pixel
    block holds foreground): the background cells agree whatever the object is."""
    from lwm.synthetic_vision import foreground

    _, codes_a = vqgan.encode(to_pixels(frames_a), progress=False)
    _, codes_b = vqgan.encode(to_pixels(frames_b), progress=False)
    equal = np.asarray(codes_a) == np.asarray(codes_b)  # [N, h, w]
    if not objects_only:
        return float(equal.mean())
    n, h, w = equal.shape
    cell = np.asarray(frames_a).shape[1] // h
    drawn = np.stack([foreground(a) | foreground(b) for a, b in zip(frames_a, frames_b)])  # [N, H, W]
    cells = drawn.reshape(n, h, cell, w, cell).any(axis=(2, 4))
    return float(equal[cells].mean())


def reconstruction(vqgan: VQGAN, frames: np.ndarray) -> np.ndarray:
    """uint8 frames after an encode-decode round trip."""
    _, codes = vqgan.encode(to_pixels(frames), progress=False)
    pixels = np.asarray(vqgan.decode(codes, progress=False))
    return np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
