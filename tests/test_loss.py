"""Blockwise LM head loss: values and gradients against float64 numpy and the dense version,
sharded over an 8-device mesh, and a compile-time memory check that no [S, V] array exists."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

from lwm.loss import LossSums, dense_lm_head_loss, lm_head_loss

HIGHEST = jax.lax.Precision.HIGHEST


def make_inputs(seed, batch=2, seq=48, hidden=16, vocab=37, dtype=np.float32):
    """Random inputs with fractional weights, zero-weight tokens, out-of-range targets on some
    zero-weight tokens (padding may carry any id) and a third of targets set to the argmax."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(batch, seq, hidden)).astype(dtype)
    w_kernel = (rng.normal(size=(hidden, vocab)) * 0.5).astype(dtype)
    targets = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    predicted = (h.astype(np.float64) @ w_kernel.astype(np.float64)).argmax(-1)
    hit = rng.uniform(size=(batch, seq)) < 1 / 3
    targets[hit] = predicted[hit]
    weights = rng.uniform(0.1, 1.5, size=(batch, seq)).astype(np.float32)
    zero = rng.uniform(size=(batch, seq)) < 0.3
    weights[zero] = 0.0
    targets[zero & (rng.uniform(size=(batch, seq)) < 0.5)] = vocab + 3
    return h, w_kernel, targets, weights


def numpy_reference(h, kernel, targets, weights):
    """Sums and gradients in float64 from the textbook formulas."""
    h, kernel = np.asarray(h, np.float64), np.asarray(kernel, np.float64)
    weights = np.asarray(weights, np.float64)
    logits = h @ kernel  # [B, S, V]
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    onehot = np.arange(kernel.shape[1]) == targets[..., None]
    target_logit = np.where(onehot, logits, 0.0).sum(-1)
    nll = lse - target_logit
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    dlogits = weights[..., None] * (np.exp(logits - lse[..., None]) - onehot)
    grads = dict(hidden=dlogits @ kernel.T, kernel=np.einsum("bsh,bsv->hv", h, dlogits), weights=nll)
    sums = ((weights * nll).sum(), weights.sum(), (weights * correct).sum())
    return sums, grads


def value_and_grads(fn, h, kernel, targets, weights, **kw):
    def loss(h, kernel, weights):
        sums = fn(h, kernel, targets, weights, **kw)
        return sums.loss_sum, sums

    (_, sums), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        h, kernel, weights)
    return sums, dict(zip(("hidden", "kernel", "weights"), grads))


def test_worked_example_from_docstring():
    # hidden @ kernel gives logits [1, 2, 0] for the one token (identity kernel).
    h = jnp.array([[[1.0, 2.0, 0.0]]])
    sums = lm_head_loss(h, jnp.eye(3), jnp.array([[1]]), jnp.array([[0.5]]), chunk_size=1)
    assert isinstance(sums, LossSums)
    lse = np.log(np.e + np.e ** 2 + 1.0)
    np.testing.assert_allclose(sums.loss_sum, 0.5 * (lse - 2.0), rtol=1e-6)
    np.testing.assert_allclose(float(sums.loss_sum), 0.2038, atol=1e-4)
    assert float(sums.weight_sum) == 0.5 and float(sums.correct_sum) == 0.5


@pytest.mark.parametrize("chunk_size", [4, 12, 48, 4096])  # 4096 > S: clipped to S
def test_chunked_matches_numpy_and_dense(chunk_size):
    h, kernel, targets, weights = make_inputs(seed=chunk_size)
    (ref_loss, ref_wsum, ref_correct), ref_grads = numpy_reference(h, kernel, targets, weights)
    sums, grads = value_and_grads(lm_head_loss, h, kernel, targets, weights,
                                  chunk_size=chunk_size, precision=HIGHEST)
    dense_sums, dense_grads = value_and_grads(dense_lm_head_loss, h, kernel, targets, weights,
                                              precision=HIGHEST)
    for got in (sums, dense_sums):
        np.testing.assert_allclose(got.loss_sum, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(got.weight_sum, ref_wsum, rtol=1e-6)
        np.testing.assert_allclose(got.correct_sum, ref_correct, rtol=1e-5)
    assert 0 < float(sums.correct_sum) < float(sums.weight_sum)  # accuracy is exercised
    for name in ("hidden", "kernel", "weights"):
        assert np.isfinite(grads[name]).all()
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(grads[name], dense_grads[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # Zero-weight tokens get exactly zero hidden gradient.
    assert np.all(np.asarray(grads["hidden"])[weights == 0] == 0.0)


def test_bf16_inputs_match_float64_of_rounded_inputs():
    h, kernel, targets, weights = make_inputs(seed=7)
    h16, k16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    (ref_loss, _, ref_correct), ref_grads = numpy_reference(
        np.asarray(h16, np.float32), np.asarray(k16, np.float32), targets, weights)
    sums, grads = value_and_grads(lm_head_loss, h16, k16, targets, weights, chunk_size=16)
    # Products of bf16 numbers are exact in float32 and the sums accumulate in float32.
    np.testing.assert_allclose(sums.loss_sum, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(sums.correct_sum, ref_correct, rtol=1e-5)
    assert grads["hidden"].dtype == jnp.bfloat16 and grads["kernel"].dtype == jnp.bfloat16
    # dlogits are rounded to bf16 (8 mantissa bits) before the backward matmuls, as autodiff of
    # a bf16 head does: errors of a few bf16 ulps of the largest entry.
    for name in ("hidden", "kernel"):
        ref = ref_grads[name]
        err = np.abs(np.asarray(grads[name], np.float64) - ref).max()
        assert err <= 2 ** -6 * np.abs(ref).max(), (name, err)


def test_accuracy_breaks_ties_like_argmax():
    """Tied maxima count as correct only for the first of them, as jnp.argmax picks it."""
    h, kernel, targets, weights = make_inputs(seed=5)
    kernel[:, 7] = kernel[:, 3]  # columns 3 and 7 always tie
    kernel[:, 20] = kernel[:, 3]
    h[0, :10] = np.abs(h[0, :10])
    kernel[:, 3] = np.abs(kernel[:, 3]) * 10  # ... and win on the first 10 tokens of row 0
    kernel[:, 7], kernel[:, 20] = kernel[:, 3], kernel[:, 3]
    targets[0, :10] = [3, 7, 20, 3, 7, 20, 3, 3, 1, 7]
    weights[0, :10] = 1.0
    kernel_zero = np.zeros_like(kernel)  # every logit ties: only target 0 is "correct"
    targets[1, :6] = [0, 1, 0, 5, 0, 36]
    weights[1, :6] = 1.0
    for k in (kernel, kernel_zero):
        got = lm_head_loss(h, k, targets, weights, chunk_size=8)
        want = dense_lm_head_loss(h, k, targets, weights)
        np.testing.assert_allclose(got.correct_sum, want.correct_sum, rtol=1e-6)
        np.testing.assert_allclose(got.loss_sum, want.loss_sum, rtol=1e-5)
    hits = lm_head_loss(h[:1, :10], kernel, targets[:1, :10], np.ones((1, 10), np.float32), chunk_size=5)
    assert float(hits.correct_sum) == 4.0  # the four 3s


def test_logits_dtype_rounds_logits():
    h, kernel, targets, weights = make_inputs(seed=3)
    sums = lm_head_loss(h, kernel, targets, weights, chunk_size=8, logits_dtype=jnp.bfloat16)
    dense = dense_lm_head_loss(h, kernel, targets, weights, logits_dtype=jnp.bfloat16)
    full = lm_head_loss(h, kernel, targets, weights, chunk_size=8)
    np.testing.assert_allclose(sums.loss_sum, dense.loss_sum, rtol=1e-5)
    assert float(sums.loss_sum) != float(full.loss_sum)  # the rounding is really applied


def sharded_head_step(mesh_shape, vocab, **sharding):
    """A jitted value-and-grad of lm_head_loss on a (dp, fsdp, tp, sp) mesh of 8 devices, its
    inputs, and the unsharded reference sums and gradients."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("dp", "fsdp", "tp", "sp"))
    h, kernel, targets, weights = make_inputs(seed=11, batch=2, seq=64, hidden=16, vocab=vocab)
    activation = NamedSharding(mesh, PS(("dp", "fsdp"), "sp", None))
    tokens = NamedSharding(mesh, PS(("dp", "fsdp"), "sp"))
    head = NamedSharding(mesh, PS(("fsdp", "sp"), "tp"))
    sharding = {k: (mesh if v == "mesh" else v) for k, v in sharding.items()}

    def loss(h, kernel, weights, targets):
        # 64 / sp tokens per shard in chunks of 4: the first starts the gradient sum, the rest loop
        sums = lm_head_loss(h, kernel, targets, weights, chunk_size=4, precision=HIGHEST, **sharding)
        return sums.loss_sum, sums

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                   in_shardings=(activation, head, tokens, tokens))
    ref = value_and_grads(lm_head_loss, h, kernel, targets, weights, chunk_size=8, precision=HIGHEST)
    return step, (h, kernel, weights, targets), ref, activation


def check_against_reference(step, args, ref, activation, kernel_grad_sharded=True):
    (_, sums), grads = step(*args)
    ref_sums, ref_grads = ref
    for got, want in zip(sums, ref_sums):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, name in zip(grads, ("hidden", "kernel", "weights")):
        np.testing.assert_allclose(got, ref_grads[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert grads[0].sharding.is_equivalent_to(activation, 3)  # dhidden stays sequence-sharded
    if kernel_grad_sharded:  # lands in the kernel's own sharding, ready for the optimizer
        assert grads[1].sharding.is_equivalent_to(NamedSharding(activation.mesh, PS(("fsdp", "sp"), "tp")), 2)
    return step.lower(*args).compile().as_text()


@pytest.mark.parametrize("mesh_shape", [(1, 2, 1, 4), (1, 2, 2, 2), (2, 1, 1, 4), (1, 1, 1, 8)])
def test_vocab_parallel_head_matches_unsharded(mesh_shape):
    """With a mesh whose sp x tp divides the vocabulary, each device holds a vocabulary slice of
    the kernel: the full [H, V] kernel is never gathered and its gradient never all-reduced."""
    hlo = check_against_reference(*sharded_head_step(mesh_shape, vocab=40, mesh="mesh"))
    assert not re.search(r"= f32\[16,40\]\S* (all-gather|all-reduce|reduce-scatter)\(", hlo)
    assert re.search(r" all-to-all\(", hlo)  # the kernel slice and its gradient change sharding


def test_vocab_parallel_head_in_bf16_matches_float64_of_rounded_inputs():
    """The bf16 vocabulary-parallel head rounds exp(logits - max) and scale * h to bf16 (its
    dlogits are never materialised): its gradients stay within the plain bf16 head's bound."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 1, 2, 4), ("dp", "fsdp", "tp", "sp"))
    h, kernel, targets, weights = make_inputs(seed=9, batch=2, seq=64, hidden=16, vocab=40)
    h16, k16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    (ref_loss, _, ref_correct), ref_grads = numpy_reference(
        np.asarray(h16, np.float32), np.asarray(k16, np.float32), targets, weights)
    shard = lambda spec: NamedSharding(mesh, spec)
    tokens = shard(PS(("dp", "fsdp"), "sp"))
    sums, grads = value_and_grads(
        lm_head_loss, jax.device_put(h16, tokens), jax.device_put(k16, shard(PS(("fsdp", "sp"), "tp"))),
        jax.device_put(targets, tokens), jax.device_put(weights, tokens), chunk_size=4, mesh=mesh)
    np.testing.assert_allclose(sums.loss_sum, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(sums.correct_sum, ref_correct, rtol=1e-5)
    assert grads["hidden"].dtype == jnp.bfloat16 and grads["kernel"].dtype == jnp.bfloat16
    for name in ("hidden", "kernel"):
        ref = ref_grads[name]
        err = np.abs(np.asarray(grads[name], np.float64) - ref).max()
        assert err <= 2 ** -6 * np.abs(ref).max(), (name, err)
    np.testing.assert_allclose(grads["weights"], ref_grads["weights"], rtol=1e-4, atol=1e-5)


def test_vocab_parallel_accuracy_breaks_ties_across_slices():
    """A row max tied between vocabulary slices on different devices counts only for the first."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 1, 1, 8), ("dp", "fsdp", "tp", "sp"))
    h, kernel, targets, weights = make_inputs(seed=4, batch=1, seq=64, hidden=16, vocab=40)  # slices of 5
    h = np.abs(h)
    kernel[:, 3] = np.abs(kernel[:, 3]) * 10  # the max everywhere, tied with columns 17 and 36
    kernel[:, 17], kernel[:, 36] = kernel[:, 3], kernel[:, 3]
    targets[0, :12] = [3, 17, 36, 3, 17, 36, 3, 3, 1, 17, 3, 36]
    weights[0, :12] = 1.0
    shard = lambda spec: NamedSharding(mesh, spec)
    args = (jax.device_put(h, shard(PS(("dp", "fsdp"), "sp"))), jax.device_put(kernel, shard(PS(("fsdp", "sp"), "tp"))),
            jax.device_put(targets, shard(PS(("dp", "fsdp"), "sp"))), jax.device_put(weights, shard(PS(("dp", "fsdp"), "sp"))))
    grad = jax.jit(jax.grad(lambda h, k, t, w: lm_head_loss(h, k, t, w, chunk_size=4, mesh=mesh).correct_sum,
                            argnums=3))  # the gradient pass is the vocabulary-parallel one
    dense = dense_lm_head_loss(h, kernel, targets, weights)
    got = np.asarray(grad(*args))  # d correct_sum / d weights = per-token correct
    want = (np.asarray(h, np.float64) @ kernel.astype(np.float64)).argmax(-1) == targets
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert got[0, :12].sum() == 5 and float(dense.correct_sum) == float((weights * want).sum())


def test_mesh_without_vocab_split_reduce_scatters_the_gradient():
    """Vocabulary 42 is not divisible by sp = 4: the whole kernel is gathered once and the head
    gradient reduce-scattered into its sharding, never all-reduced at full size."""
    hlo = check_against_reference(*sharded_head_step((1, 2, 1, 4), vocab=42, mesh="mesh"))
    assert re.search(r"= f32\[2,42\]\S* reduce-scatter\(", hlo), "expected a reduce-scatter into [16/8, 42]"
    assert not re.search(r"= f32\[16,42\]\S* all-reduce\(", hlo)
    assert len(re.findall(r"= f32\[16,42\]\S* all-gather\(", hlo)) == 1


def test_sharded_mesh_matches_unsharded():
    """Given only shard counts (no mesh), GSPMD shards the plain path, and every collective
    (head all-gather, partial-sum all-reduce) sits outside the chunk loops."""
    hlo = check_against_reference(*sharded_head_step((1, 2, 1, 4), vocab=40, seq_shards=4, batch_shards=2),
                                  kernel_grad_sharded=False)
    computations = hlo_computations(hlo)
    assert any(COLLECTIVE.search(line) for body in computations.values() for line in body)
    loop_bodies = {name for body in computations.values() for line in body
                   for name in re.findall(r"body=%([\w.\-]+)", line)}
    assert loop_bodies, "expected the chunk loops to compile to while loops"
    for name in reachable(computations, loop_bodies):
        in_loop = [line for line in computations[name] if COLLECTIVE.search(line)]
        assert not in_loop, in_loop[:2]


COLLECTIVE = re.compile(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(-start)?\(")


def hlo_computations(hlo_text):
    """{computation name: its instruction lines} from compiled HLO text."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return computations


def reachable(computations, roots):
    """The named computations plus everything they call (fusions, nested loops, reducers)."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
    return seen


def test_memory_has_no_sequence_by_vocab_array():
    s, v, h = 8192, 32000, 64
    shapes = (jax.ShapeDtypeStruct((1, s, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32),
              jax.ShapeDtypeStruct((1, s), jnp.int32), jax.ShapeDtypeStruct((1, s), jnp.float32))

    def temp_bytes(fn, **kw):
        grad_fn = jax.value_and_grad(lambda *a: fn(*a, **kw).loss_sum, argnums=(0, 1))
        return jax.jit(grad_fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    full = s * v * 4  # one [S, V] float32 array
    chunked = temp_bytes(lm_head_loss, chunk_size=512)
    dense = temp_bytes(dense_lm_head_loss)
    assert dense > full, (dense, full)
    # One chunk's logits are 512 * V * 4 = full / 16; allow a few of them live at once.
    assert chunked < full / 4, (chunked, full)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq=30, chunk_size=8), "does not divide the per-shard sequence length 30"),
    (dict(seq=32, seq_shards=3), "not divisible by seq_shards=3"),
    (dict(seq=32, batch_shards=3), "not divisible by batch_shards=3"),
    (dict(seq=32, chunk_size=0), "must be >= 1"),
])
def test_bad_chunking_raises(kwargs, message):
    seq = kwargs.pop("seq")
    h, kernel, targets, weights = make_inputs(seed=0, seq=seq)
    with pytest.raises(ValueError, match=message):
        lm_head_loss(h, kernel, targets, weights, **kwargs)


def test_bad_shapes_raise():
    h, kernel, targets, weights = make_inputs(seed=0, seq=16)
    with pytest.raises(ValueError, match="head_kernel rows 8 != hidden size 16"):
        lm_head_loss(h, kernel[:8], targets, weights)
    with pytest.raises(ValueError, match=r"targets must be \[batch, seq\]"):
        lm_head_loss(h, kernel, targets[:, :8], weights)
    with pytest.raises(ValueError, match="integer token ids"):
        lm_head_loss(h, kernel, targets.astype(np.float32), weights)
    with pytest.raises(ValueError, match=r"hidden must be \[batch, seq, hidden\]"):
        dense_lm_head_loss(h[0], kernel, targets, weights)
