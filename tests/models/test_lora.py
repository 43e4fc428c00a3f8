"""LoRA adapters: exactness at init, merge, gradients, PEFT parity, round trip, config, sharding."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from lora_helpers import randomize_adapters

from jaxalign import sharding
from jaxalign.config import ConfigError, lora_block
from jaxalign.models import from_pretrained, init_model, lora, lora_io, qwen2, save_pretrained
from jaxalign.models.lora import LoraConfig, apply_lora, lora_filter, merge_lora, strip_lora

TOL = 1e-4
ALL = tuple(lora.TARGET_MODULES)


def tiny_model(**overrides):
    return init_model(qwen2.tiny(vocab_size=256, **overrides), seed=0)


@nnx.jit
def forward(model, ids):
    """Logits, jitted: one compile per model structure beats eager dispatch on a cold cache."""
    return model(ids)


def ids_batch(vocab, shape=(2, 9), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def make_hf(tmp_path, seed=0, **overrides):
    """A tiny random transformers Qwen2 saved to ``tmp_path/hf`` (random biases and norms)."""
    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


# --- (a) a fresh adapter changes nothing -------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_zero_b_equals_base_exactly(tied):
    model = tiny_model(tie_word_embeddings=tied)
    ids = ids_batch(256)
    base = np.asarray(forward(model, ids))
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.1))  # dropout is off outside training
    assert len(lora.lora_modules(model)) == 2 * 7
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), base)
    # PEFT's init: B = 0, A uniform within 1/sqrt(fan_in) (kaiming-uniform, a=sqrt(5)).
    q = model.model.layers[0].self_attn.q_proj
    o = model.model.layers[0].self_attn.o_proj
    assert not np.asarray(q.lora_B[...]).any()
    assert np.abs(np.asarray(q.lora_A[...])).max() <= 64**-0.5
    assert np.abs(np.asarray(o.lora_A[...])).max() <= 64**-0.5  # fan_in N * H = 64
    assert np.asarray(q.lora_A[...]).std() > 0.5 * 64**-0.5 / np.sqrt(3)


def test_base_dtype_stores_frozen_weights_in_bf16():
    model = tiny_model()
    ids = ids_batch(256)
    reference = tiny_model()
    for _, var in nnx.iter_graph(reference):
        if isinstance(var, nnx.Param):
            var.set_value(var[...].astype(jnp.bfloat16))
    apply_lora(model, LoraConfig(rank=4, alpha=8, base_dtype="bfloat16"))
    dtypes = {type(v).__name__: set() for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            dtypes[type(v).__name__].add(jnp.dtype(v.dtype).name)
    assert dtypes == {"Param": {"bfloat16"}, "LoraParam": {"float32"}}
    np.testing.assert_array_equal(np.asarray(forward(model, ids)),
                                  np.asarray(forward(reference, ids)))
    assert merge_lora(model).config.param_dtype == jnp.bfloat16


# --- (b) merge == adapted forward ---------------------------------------------------------


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (("q_proj", "v_proj"), True)])
def test_merged_equals_adapted_forward(targets, rslora):
    model = tiny_model(tie_word_embeddings=False)
    ids = ids_batch(256)
    base = np.asarray(forward(model, ids))
    apply_lora(model, LoraConfig(rank=4, alpha=8, target_modules=targets, use_rslora=rslora))
    assert lora.lora_config_of(model).scale == (4.0 if rslora else 2.0)
    randomize_adapters(model)
    adapted = np.asarray(forward(model, ids))
    assert np.abs(adapted - base).max() > 0.1  # the adapters do something
    merged = merge_lora(model)
    # Untargeted and non-kernel parameters are shared, not copied.
    assert merged.model.embed_tokens.weight[...] is model.model.embed_tokens.weight[...]
    assert isinstance(merged, qwen2.Qwen2ForCausalLM) and not lora.has_lora(merged)
    assert not jax.tree.leaves(nnx.state(merged, lora_filter))
    np.testing.assert_allclose(np.asarray(forward(merged, ids)), adapted, atol=1e-5, rtol=0)
    # Neither merging nor stripping touches the adapted model; stripping gives the base.
    np.testing.assert_array_equal(np.asarray(forward(model, ids)), adapted)
    np.testing.assert_array_equal(np.asarray(forward(strip_lora(model), ids)), base)


# --- (c) only the adapters get gradients ---------------------------------------------------


def test_gradients_reach_only_adapters():
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    ids = jnp.asarray(ids_batch(256))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), -1))

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora_filter)))(model)
    leaves = list(nnx.to_flat_state(grads))
    assert len(leaves) == 4 * 7  # (A, B) x 7 modules x 2 layers, nothing else
    assert all(path[-1] in ("lora_A", "lora_B") for path, _ in leaves)
    assert sum(x.size for _, x in leaves) == lora.count_lora_params(model)
    q = grads["model"]["layers"][0]["self_attn"]["q_proj"]
    assert not np.asarray(q["lora_A"][...]).any()  # B = 0 blocks A's gradient
    assert np.abs(np.asarray(q["lora_B"][...])).max() > 0

    # The trainer's functional form: differentiate the adapters, pass the rest through.
    graphdef, adapters, frozen = nnx.split(model, lora_filter, ...)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(adapters, opt_state, frozen):
        g = jax.grad(lambda a: loss(nnx.merge(graphdef, a, frozen)))(adapters)
        updates, opt_state = tx.update(g, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    new_adapters, _ = step(adapters, tx.init(adapters), frozen)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(adapters), jax.tree.leaves(new_adapters), strict=True))
    assert jax.tree.structure(nnx.state(model, lora.frozen_filter)) == jax.tree.structure(frozen)


def test_dropout_only_in_the_train_view():
    model = tiny_model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.5))
    randomize_adapters(model)
    ids = jnp.asarray(ids_batch(256))
    graphdef, adapters, rest = nnx.split(model, lora_filter, ...)

    @jax.jit
    def loss_and_grad(adapters, rest, key):
        def loss(a):
            m = lora.train_view(nnx.merge(graphdef, a, rest), key)
            return jnp.mean(m(ids) ** 2)
        return jax.value_and_grad(loss)(adapters)

    l0, _ = loss_and_grad(adapters, rest, jax.random.key(0))
    l0_again, _ = loss_and_grad(adapters, rest, jax.random.key(0))
    l1, _ = loss_and_grad(adapters, rest, jax.random.key(1))
    assert float(l0) == float(l0_again) and float(l0) != float(l1)
    eval_loss = float(jnp.mean(forward(model, ids) ** 2))
    assert eval_loss == float(jnp.mean(forward(model, ids) ** 2)) != float(l0)
    assert lora.train_view(tiny_model()) is not None  # no adapters: the model itself


# --- (d) PEFT loads our adapter with the same logits; merged export loads in transformers --


@pytest.mark.parametrize("case", [
    dict(hf=dict(), lora=dict(rank=4, alpha=8.0)),
    dict(hf=dict(tie_word_embeddings=True),
         lora=dict(rank=2, alpha=3.0, target_modules=("q_proj", "v_proj", "down_proj"),
                   use_rslora=True)),
])
def test_peft_loads_the_exported_adapter(tmp_path, case):
    peft = pytest.importorskip("peft")
    model = from_pretrained(make_hf(tmp_path, **case["hf"]), dtype=jnp.float32)
    apply_lora(model, LoraConfig(**case["lora"]))
    randomize_adapters(model)
    ids = ids_batch(300, (3, 11))
    ours = np.asarray(forward(model, ids))

    base_dir = save_pretrained(strip_lora(model), tmp_path / "base")
    adapter_dir = lora_io.save_adapter(model, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == case["lora"]["rank"] and config["peft_type"] == "LORA"
    hf = transformers.Qwen2ForCausalLM.from_pretrained(base_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    np.testing.assert_allclose(torch_logits(peft_model, ids), ours, atol=TOL, rtol=0)
    a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert tuple(a.shape) == (case["lora"]["rank"], 64)

    # save_pretrained of an adapted model writes it merged: plain transformers loads it.
    merged_dir = save_pretrained(model, tmp_path / "merged")
    merged_hf = transformers.Qwen2ForCausalLM.from_pretrained(merged_dir).eval()
    np.testing.assert_allclose(torch_logits(merged_hf, ids), ours, atol=TOL, rtol=0)


# --- (e) round trip -----------------------------------------------------------------------


def test_adapter_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    apply_lora(model, LoraConfig(rank=4, alpha=16, dropout=0.05,
                                 target_modules="o_proj,gate_proj,k_proj"))
    randomize_adapters(model)
    out = lora_io.save_adapter(model, tmp_path / "adapter")
    assert lora_io.read_adapter_config(out) == lora.lora_config_of(model)

    fresh = load = lora_io.load_adapter(tiny_model(tie_word_embeddings=False), out)
    assert load is fresh
    for (pa, a), (pb, b) in zip(
        jax.tree.leaves_with_path(nnx.state(model, lora_filter)),
        jax.tree.leaves_with_path(nnx.state(fresh, lora_filter)), strict=True,
    ):
        assert pa == pb and a.dtype == b.dtype and np.array_equal(a, b), pa
    ids = ids_batch(256)
    np.testing.assert_array_equal(np.asarray(forward(fresh, ids)), np.asarray(forward(model, ids)))

    # Onto a model that already has the same adapters: overwritten in place.
    other = apply_lora(tiny_model(tie_word_embeddings=False), lora.lora_config_of(model), seed=7)
    lora_io.load_adapter(other, out)
    np.testing.assert_array_equal(np.asarray(forward(other, ids)), np.asarray(forward(model, ids)))
    # ... but not onto different ones, nor onto a model of another shape.
    with pytest.raises(lora_io.CheckpointError, match="differs from the model"):
        lora_io.load_adapter(apply_lora(tiny_model(), LoraConfig(rank=8, alpha=16)), out)
    with pytest.raises(lora_io.CheckpointError, match="lora_A.weight.*has shape"):
        lora_io.load_adapter(init_model(qwen2.tiny(vocab_size=256, hidden_size=32)), out)


def test_bad_adapter_directories(tmp_path):
    with pytest.raises(lora_io.CheckpointError, match="adapter_config.json: not found"):
        lora_io.read_adapter_config(tmp_path)
    base = dict(peft_type="LORA", r=4, lora_alpha=8, target_modules=["q_proj"])
    bad = {
        "use_dora": dict(use_dora=True),
        "regular expressions": dict(target_modules=".*q_proj"),
        "jaxalign adapts only": dict(target_modules=["q_proj", "lm_head"]),
        "peft_type": dict(peft_type="IA3"),
        "layers_to_transform": dict(layers_to_transform=[0]),
    }
    for message, change in bad.items():
        (tmp_path / "adapter_config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(lora_io.CheckpointError, match=message):
            lora_io.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**base,
                                                              "target_modules": "all-linear"}))
    assert lora_io.read_adapter_config(tmp_path).target_modules == ALL
    with pytest.raises(lora_io.CheckpointError, match="adapter_model.safetensors: not found"):
        lora_io.load_adapter(tiny_model(), tmp_path)


# --- (f) config errors name the field -------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(rank=0, alpha=8), "rank=0"),
    (dict(rank=-2, alpha=8), "rank=-2"),
    (dict(rank=4, alpha=0), "alpha=0"),
    (dict(rank=4, alpha=8, dropout=1.0), "dropout=1.0"),
    (dict(rank=4, alpha=8, target_modules=("q_proj", "qkv_proj")), "target_modules.*'qkv_proj'"),
    (dict(rank=4, alpha=8, target_modules=""), "target_modules is empty"),
    (dict(rank=4, alpha=8, base_dtype="int8"), "base_dtype='int8'"),
])
def test_bad_lora_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"LoraConfig.{field}"):
        LoraConfig(**kwargs)


def test_config_block():
    block = lora_block()
    assert block.target_modules == ",".join(lora.TARGET_MODULES)  # the one default
    assert lora.lora_config_from_block(block) is None  # rank 0: off
    block.rank, block.dropout, block.base_dtype = 16, 0.05, "bfloat16"
    cfg = lora.lora_config_from_block(block)
    assert (cfg.rank, cfg.alpha, cfg.scale, cfg.target_modules) == (16, 32.0, 2.0, ALL)
    assert cfg.base_dtype == "bfloat16"
    for field, value, message in [
        ("rank", -1, r"config.lora.rank=-1: must be an integer >= 0"),
        ("target_modules", "q_proj,w_proj", r"config.lora.target_modules: unknown.*'w_proj'"),
        ("base_dtype", "fp8", r"config.lora.base_dtype='fp8'"),
        ("dropout", 1.5, r"config.lora.dropout=1.5"),
    ]:
        bad = ml_collections.ConfigDict(block.to_dict())
        setattr(bad, field, value)
        with pytest.raises(ConfigError, match=message):
            lora.validate_lora(bad)


def test_full_size_shapes_without_memory():
    """Qwen2.5-Math-1.5B's shapes (2 of its 28 layers, to trace fast) at rank 16 on all seven
    projections: PEFT's trainable count (18,464,768 for the whole model), no memory."""
    cfg = qwen2.qwen2p5_math_1p5b().replace(num_hidden_layers=2)
    model = nnx.eval_shape(lambda: apply_lora(
        qwen2.Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)),
        LoraConfig(rank=16, alpha=32, base_dtype="bfloat16")))
    d, f, nh, kh = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, 2 * cfg.head_dim
    per_layer = (d + nh) + 2 * (d + kh) + (nh + d) + 2 * (d + f) + (f + d)
    assert lora.count_lora_params(model) == 16 * per_layer * 2
    assert 16 * per_layer * 28 == 18_464_768
    frozen = jax.tree.leaves(nnx.state(model, lora.frozen_filter))
    assert {x.dtype for x in frozen} == {jnp.dtype(jnp.bfloat16)}
    assert sum(x.size for x in frozen) == cfg.num_params()


# --- (g) sharding: adapters follow their base kernels -----------------------------------------


EXPECTED_SPECS = {  # (A, B) on a (data 1, fsdp 2, tensor 4) mesh; kv_heads=2 stays replicated
    "q_proj": (("fsdp", None), (None, "tensor", None)),
    "k_proj": (("fsdp", None), (None, None, None)),
    "v_proj": (("fsdp", None), (None, None, None)),
    "o_proj": (("tensor", None, None), (None, "fsdp")),
    "gate_proj": (("fsdp", None), (None, "tensor")),
    "up_proj": (("fsdp", None), (None, "tensor")),
    "down_proj": (("tensor", None), (None, "fsdp")),
}


def _specs(model):
    out = {}
    for path, mod in lora.lora_modules(model).items():
        name = path.rsplit(".", 1)[-1]
        out.setdefault(name, set()).add(
            (tuple(mod.lora_A[...].sharding.spec), tuple(mod.lora_B[...].sharding.spec)))
    return out


def test_adapters_follow_base_sharding():
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    expected = {k: {v} for k, v in EXPECTED_SPECS.items()}

    # A model placed on the mesh first: apply_lora places the adapters beside the kernels.
    model = tiny_model()
    ids = ids_batch(256, (4, 8))
    nnx.update(model, sharding.shard_params(nnx.state(model, nnx.Param), mesh))
    apply_lora(model, LoraConfig(rank=4, alpha=8))
    assert _specs(model) == expected
    # The trainer's placement by logical axes (PARAM_RULES) agrees.
    unplaced = apply_lora(tiny_model(), LoraConfig(rank=4, alpha=8))
    nnx.update(unplaced, sharding.shard_params(nnx.state(unplaced, nnx.Param), mesh))
    assert _specs(unplaced) == expected

    # Merged kernels keep the base kernel's sharding; sharded == unsharded.
    randomize_adapters(model)
    randomize_adapters(unplaced)
    merged = merge_lora(model)
    q = merged.model.layers[0].self_attn.q_proj.weight[...]
    assert tuple(q.sharding.spec) == ("fsdp", "tensor", None)
    reference = tiny_model()
    apply_lora(reference, LoraConfig(rank=4, alpha=8))
    randomize_adapters(reference)
    on_mesh = nnx.jit(sharding.traced_on(mesh, lambda m, x: m(x)))
    np.testing.assert_allclose(np.asarray(on_mesh(model, ids)),
                               np.asarray(forward(reference, ids)), atol=1e-5, rtol=0)
