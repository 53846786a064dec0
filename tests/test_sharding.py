"""Sharding on 8 fake CPU devices (conftest): the same numbers on every mesh, parameters really split,
dimensions that don't divide their mesh axis replicated (with a warning), batches placed by rows."""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import llama_jax as lj
from llama_jax import sharding
from llama_jax.model import apply
from llama_jax.sharding import ShardingFallbackWarning, make_mesh

BATCH, SEQ = 8, 16


def next_token_loss(params, tokens, cfg):
    logits = apply(params, tokens[:, :-1], cfg)[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def run(cfg, params, tokens, mesh=None):
    """Logits and gradients of the next-token loss, on `mesh` (None: one device, no mesh)."""
    def f(params, tokens):
        logits = apply(params, tokens, cfg)[0]
        loss, grads = jax.value_and_grad(next_token_loss)(params, tokens, cfg)
        return logits, loss, grads

    if mesh is None:
        out = jax.jit(f)(params, tokens)
    else:
        with jax.set_mesh(mesh):
            params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
            tokens = sharding.place_batch(np.asarray(tokens), mesh)
            out = jax.jit(f)(params, tokens)
    return jax.tree.map(np.asarray, out), params


@pytest.fixture(scope="module")
def tiny():
    cfg = lj.PRESETS["tiny"]
    params = lj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size, jnp.int32)
    return cfg, params, tokens, run(cfg, params, tokens)[0]


def assert_close(got, want, tol=1e-5):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for k in path:
            w = w[k.key if hasattr(k, "key") else k.idx]
        err = float(np.max(np.abs(np.asarray(g) - np.asarray(w))))
        assert err <= tol, f"{jax.tree_util.keystr(path)}: max abs difference {err}"


MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "data%d-fsdp%d-tensor%d" % s)
def test_same_logits_and_gradients_on_every_mesh(tiny, shape):
    cfg, params, tokens, (logits1, loss1, grads1) = tiny
    d, f, t = shape
    mesh = make_mesh(d, f, t, devices=jax.devices()[: d * f * t])
    (logits, loss, grads), placed = run(cfg, params, tokens, mesh)
    assert_close(logits, logits1)
    assert abs(float(loss) - float(loss1)) <= 1e-5
    assert_close(grads, grads1)
    # The parameters really were split the way the rules say (not silently replicated).
    q = placed["layers"]["attn"]["q"].sharding.spec
    assert q == P(None, "fsdp" if f > 1 else None, "tensor" if t > 1 else None, None)


def test_gqa_kv_heads_not_dividing_tensor_are_replicated():
    """tiny-gqa has 2 kv heads and tensor=4: k and v projections are replicated across tensor (with a
    warning naming the constraint); results still equal one device's."""
    cfg = lj.PRESETS["tiny-gqa"]
    params = lj.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size, jnp.int32)
    want = run(cfg, params, tokens)[0]
    mesh = make_mesh(1, 2, 4)
    with pytest.warns(ShardingFallbackWarning, match=r"kv_heads=2\) is not divisible by mesh axis tensor=4"):
        got, placed = run(cfg, params, tokens, mesh)
    assert placed["layers"]["attn"]["k"].sharding.spec == P(None, "fsdp", None, None)
    assert placed["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert_close(got[0], want[0])
    assert_close(got[2], want[2])
    # Those who would rather be told than replicate:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShardingFallbackWarning)
        with pytest.raises(ShardingFallbackWarning, match="kv_heads"):
            sharding.param_shardings(cfg, mesh)


def test_vocab_not_dividing_tensor_is_replicated():
    """Llama-2-7B on tensor=3: vocab 32000 and 32 heads don't divide 3 and stay whole along tensor;
    ffn 11008 doesn't divide 3 either; embed still splits over fsdp. Nothing is allocated."""
    mesh = make_mesh(1, 2, 3, devices=jax.devices()[:6])
    with pytest.warns(ShardingFallbackWarning) as record:
        specs = sharding.param_specs(lj.PRESETS["llama2-7b"], mesh=mesh)
    messages = " ".join(str(r.message) for r in record)
    assert "vocab=32000) is not divisible by mesh axis tensor=3" in messages
    assert specs["embed"] == P(None, "fsdp")
    assert specs["lm_head"] == P("fsdp", None)
    assert "heads=32) is not divisible by mesh axis tensor=3" in messages
    assert "mlp=11008) is not divisible by mesh axis tensor=3" in messages
    assert specs["layers"]["attn"]["q"] == P(None, "fsdp", None, None)  # embed 4096 still splits over fsdp=2


def test_fsdp8_every_parameter_shard_is_one_eighth():
    """tiny: every parameter has a dim of 64 (embed or norm) that fsdp=8 splits."""
    cfg = lj.PRESETS["tiny"]
    mesh = make_mesh(fsdp=8)
    params = lj.init_params(cfg, jax.random.key(0), mesh)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        assert len(x.addressable_shards) == 8
        for shard in x.addressable_shards:
            assert shard.data.size * 8 == x.size, jax.tree_util.keystr(path)
    # Sharded init gives the same values as unsharded init.
    plain = lj.init_params(cfg, jax.random.key(0))
    assert_close(params, plain, tol=0)


def test_sharded_init_never_builds_the_whole_model_on_one_device():
    """The compiled init for fsdp=8 outputs 1/8 of the parameter bytes per device, and no array in it
    (random bits included) is bigger than a parameter's share: no device ever holds the whole model."""
    cfg = lj.PRESETS["tiny"].replace(n_layers=4, dim=256, ffn_dim=512)
    mesh = make_mesh(fsdp=8)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lj.abstract_params(cfg)))
    compiled = jax.jit(lambda key: lj.init_params(cfg, key, mesh)).lower(jax.random.key(0)).compile()
    mem = compiled.memory_analysis()
    # (+ a few bytes: XLA's table of pointers to the output buffers)
    assert total // 8 <= mem.output_size_in_bytes <= total // 8 + 1024
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes < total // 2
    # No array in the partitioned program is bigger than the largest parameter's 1/8 share.
    largest = max(x.size for x in jax.tree.leaves(lj.abstract_params(cfg)))
    sizes = [math.prod(map(int, dims.split(","))) for dims in re.findall(r"[a-z]\d+\[([\d,]+)\]", compiled.as_text())]
    assert sizes and max(sizes) <= largest // 8


def test_make_mesh():
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(data=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(2, 2, -1).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in make_mesh().axis_types)
    with pytest.raises(ValueError, match="needs 12 devices, but there are 8"):
        make_mesh(data=3, fsdp=4)
    with pytest.raises(ValueError, match="8 devices are not a multiple of 3"):
        make_mesh(tensor=3)
    with pytest.raises(ValueError, match="at most one of them -1"):
        make_mesh(data=-1, fsdp=-1)
    assert sharding.parse_mesh("fsdp=16, tensor=4") == {"data": 1, "fsdp": 16, "tensor": 4}
    with pytest.raises(ValueError, match="mesh axis 'pipe' unknown"):
        sharding.parse_mesh("pipe=2")


def test_rules_are_overridable():
    """A user table replicates the vocab: parameters follow it through init_params, activations
    through use_rules."""
    cfg = lj.PRESETS["tiny"]
    mesh = make_mesh(1, 2, 4)
    rules = {**sharding.DEFAULT_RULES, "vocab": None}
    params = lj.init_params(cfg, jax.random.key(0), mesh, rules=rules)
    assert params["embed"].sharding.spec == P(None, "fsdp")
    assert lj.init_params(cfg, jax.random.key(0), mesh)["embed"].sharding.spec == P("tensor", "fsdp")
    tokens = sharding.place_batch(np.zeros((4, 8), np.int32), mesh)

    def logits(params, tokens):  # a fresh function per table: rules are read at trace time
        return apply(params, tokens, cfg)[0]

    with jax.set_mesh(mesh):
        with sharding.use_rules(rules):
            replicated = jax.jit(logits)(params, tokens)
        split = jax.jit(lambda p, t: logits(p, t))(params, tokens)
    assert replicated.sharding.shard_shape(replicated.shape) == (2, 8, cfg.vocab_size)
    assert split.sharding.shard_shape(split.shape) == (2, 8, cfg.vocab_size // 4)
    assert sharding.current_rules() is sharding.DEFAULT_RULES
    with pytest.raises(ValueError, match="rules map 'heads' to mesh axis 'model', which the mesh lacks"):
        sharding.param_shardings(cfg, mesh, {**sharding.DEFAULT_RULES, "heads": "model"})


def test_explicit_mesh_axes_are_rejected_clearly():
    cfg = lj.PRESETS["tiny"]
    mesh = jax.make_mesh((1, 8, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    params = lj.init_params(cfg, jax.random.key(0))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="Auto mesh axes"):
        jax.jit(lambda p, t: apply(p, t, cfg)[0])(params, jnp.zeros((8, 4), jnp.int32))


def test_place_batch_and_local_rows_single_process():
    mesh = make_mesh(2, 2, 2)
    batch = {"tokens": np.arange(8 * 3).reshape(8, 3).astype(np.int32), "mask": np.ones((8, 3), bool)}
    assert sharding.local_batch_rows(8, mesh) == slice(0, 8)
    placed = sharding.place_batch(batch, mesh)
    assert placed["tokens"].sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
    np.testing.assert_array_equal(np.asarray(placed["tokens"]), batch["tokens"])
    # Each device holds 2 rows (4 batch shards), replicated across tensor.
    assert {s.data.shape for s in placed["tokens"].addressable_shards} == {(2, 3)}
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 data-parallel shards"):
        sharding.local_batch_rows(6, mesh)


def test_decode_with_batch_one_on_fsdp_mesh():
    """A batch of 1 doesn't divide fsdp=8: activation constraints leave it whole instead of failing,
    and a cached decode step gives one device's logits."""
    cfg = lj.PRESETS["tiny"]
    params = lj.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray([[5, 7, 9]], jnp.int32)

    def step(params, tokens):
        cache = lj.KVCache.zeros(cfg, 1, 8)
        _, cache = apply(params, tokens[:, :2], cfg, cache=cache)
        return apply(params, tokens[:, 2:], cfg, cache=cache)[0]

    want = np.asarray(jax.jit(step)(params, tokens))
    mesh = make_mesh(fsdp=8)
    with jax.set_mesh(mesh):
        got = np.asarray(jax.jit(step)(jax.device_put(params, sharding.param_shardings(cfg, mesh)), tokens))
    assert np.max(np.abs(got - want)) <= 1e-5
    assert math.isfinite(float(got.sum()))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=lambda s: "data%d-fsdp%d-tensor%d" % s)
def test_gradient_step_gathers_weights_not_activations(shape):
    """What the constraints buy: in the compiled loss-and-gradient, the collectives gather weights
    (FSDP) and reduce partial sums (tensor), but never gather a batch-split activation or the tokens
    (which a lookup into an embed-split table used to force) and never all-to-all."""
    cfg = lj.PRESETS["tiny"].replace(vocab_size=512, dim=128, ffn_dim=256, n_heads=8, n_kv_heads=8)
    global_batch = 16  # no parameter dimension is 16 (head_dim is, but never leads)
    mesh = make_mesh(*shape)
    shardings = sharding.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          lj.abstract_params(cfg), shardings)
    tokens = jax.ShapeDtypeStruct((global_batch, 32), jnp.int32, sharding=sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(next_token_loss), static_argnums=2, out_shardings=shardings).lower(
            params, tokens, cfg).compile().as_text()
    gathers = re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather(?:-start)?\(", hlo)
    assert gathers, "expected FSDP weight all-gathers"
    assert not [g for g in gathers if g.split(",")[0] == str(global_batch)]
    assert " all-to-all(" not in hlo
    assert "Involuntary" not in hlo
