"""Parity of the NNX Qwen2 port with ``transformers`` on tiny random checkpoints (fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign import sharding
from jaxalign.models import (
    Qwen2Config,
    abstract_model,
    from_pretrained,
    init_model,
    qwen2p5_0p5b,
    qwen2p5_math_1p5b,
    save_pretrained,
    tiny,
)
from jaxalign.models.qwen2 import KVCache, param_logical_axes, positions_from_mask

TOL = 1e-4


def make_hf(tmp_path, name="hf", seed=0, **overrides):
    """Saves a tiny random transformers Qwen2 to ``tmp_path/name``; returns (dir, model)."""
    kwargs = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    # Random biases and norm weights, so a transposed or missing tensor cannot hide.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in pname else 0.0))
    out = tmp_path / name
    model.save_pretrained(out)
    return out, model


def hf_logits(model, ids, mask=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        kwargs["position_ids"] = torch.tensor(pos)
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def left_padded_batch(rng, vocab, lengths, total):
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        ids[i, total - n :] = rng.integers(0, vocab, n)
        mask[i, total - n :] = 1
    return ids, mask


CASES = {
    "untied_gqa2": dict(),
    "tied": dict(tie_word_embeddings=True),
    "gqa1_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
    "rope_linear": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "rope_dynamic": dict(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        max_position_embeddings=8,
    ),
    "rope_yarn": dict(
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 1e4,
            "original_max_position_embeddings": 16,
        }
    ),
    "rope_llama3": dict(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "rope_theta": 10000.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        }
    ),
    "sliding_window": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq_len", [7, 13])
def test_logits_match_transformers(tmp_path, case, seq_len):
    path, ref = make_hf(tmp_path, **CASES[case])
    model = from_pretrained(path, dtype=jnp.float32)
    rng = np.random.default_rng(seq_len)
    ids = rng.integers(0, 300, (3, seq_len))
    ours = np.asarray(model(ids))  # NumPy ints in, as users will call it
    theirs = hf_logits(ref, ids)
    assert ours.shape == (3, seq_len, 300)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    assert (ours[:, -1].argmax(-1) == theirs[:, -1].argmax(-1)).all()


@pytest.mark.parametrize("case", ["untied_gqa2", "tied", "gqa4", "sliding_window"])
def test_left_padding_matches_transformers(tmp_path, case):
    path, ref = make_hf(tmp_path, **CASES[case])
    model = from_pretrained(path, dtype=jnp.float32)
    ids, mask = left_padded_batch(np.random.default_rng(1), 300, [11, 5, 1, 8], 11)
    ours = np.asarray(model(ids, attention_mask=mask))
    theirs = hf_logits(ref, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=TOL, rtol=0)
    assert np.isfinite(ours).all()
    # A left-padded row equals the same tokens unpadded: padding changes nothing.
    alone = np.asarray(model(ids[1:2, -5:]))
    np.testing.assert_allclose(ours[1, -5:], alone[0], atol=TOL, rtol=0)
    assert (ours[:, -1].argmax(-1) == theirs[:, -1].argmax(-1)).all()


def test_positions_start_at_zero_on_first_real_token():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(pos, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])


def _flat_params(model):
    return {
        k: np.asarray(v)
        for k, v in (
            (".".join(map(str, p)), v[...])
            for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)
        )
    }


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_is_bitwise(tmp_path, tied):
    path, ref = make_hf(tmp_path, tie_word_embeddings=tied)
    model = from_pretrained(path, dtype=jnp.float32)
    out = save_pretrained(model, tmp_path / "export")
    again = from_pretrained(out, dtype=jnp.float32)
    a, b = _flat_params(model), _flat_params(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    ids = np.random.default_rng(0).integers(0, 300, (2, 9))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))

    # transformers loads the export unchanged, with the very tensors it saved.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref_state, new_state = ref.state_dict(), reloaded.state_dict()
    for k, v in ref_state.items():
        assert torch.equal(v, new_state[k]), k
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(ref, ids))


def test_export_bf16_and_sharded(tmp_path):
    path, _ = make_hf(tmp_path)
    model = from_pretrained(path, dtype=jnp.float32)
    out = save_pretrained(model, tmp_path / "bf16", dtype=jnp.bfloat16, max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    again = from_pretrained(out, dtype=jnp.float32)
    for k, v in _flat_params(model).items():
        np.testing.assert_array_equal(
            _flat_params(again)[k], v.astype(jnp.bfloat16).astype(np.float32)
        )


def test_a_failed_write_is_raised_after_every_gather(tmp_path, monkeypatch):
    """Process 0 alone writes; a full disk must not leave the other processes waiting in a
    gather it skipped, so the error comes after the last gather and names the directory."""
    from jaxalign.models import hf_io

    path, _ = make_hf(tmp_path)
    model = from_pretrained(path, dtype=jnp.float32)
    gathered = []
    real_gather = hf_io._gather
    monkeypatch.setattr(hf_io, "_gather", lambda x: gathered.append(1) or real_gather(x))

    def full_disk(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_io, "save_file", full_disk)
    out = tmp_path / "export"
    with pytest.raises(hf_io.CheckpointError, match=f"{out}: writing the export failed.*space"):
        save_pretrained(model, out, max_shard_size=60_000)  # several shards: all gathered
    assert len(gathered) == len(_flat_params(model))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(hf_io.CheckpointError, match="writing the export failed"):
        save_pretrained(model, tmp_path / "a_file" / "export")


def test_export_replaces_older_shards(tmp_path):
    path, _ = make_hf(tmp_path)
    model = from_pretrained(path, dtype=jnp.float32)
    out = tmp_path / "export"
    save_pretrained(model, out, max_shard_size=60_000)
    save_pretrained(model, out)  # now a single file
    assert sorted(p.name for p in out.glob("model*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    from_pretrained(out)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    path, ref = make_hf(tmp_path)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = _flat_params(from_pretrained(path))
    b = _flat_params(from_pretrained(sharded))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_tokenizer_from_model_dir(tmp_path):
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.models import CheckpointError, load_tokenizer

    path, _ = make_hf(tmp_path)
    with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
        load_tokenizer(path)
    tok = byte_tokenizer()
    model = from_pretrained(path)
    out = save_pretrained(model, tmp_path / "export", tokenizer=tok)
    loaded = load_tokenizer(out)
    assert loaded("<answer> 42")["input_ids"] == tok("<answer> 42")["input_ids"]


def test_tokenizer_files_travel_with_export(tmp_path):
    path, _ = make_hf(tmp_path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    model = from_pretrained(path)
    out = save_pretrained(model, tmp_path / "export")
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'


def test_sharded_placement_on_mesh(tmp_path):
    path, ref = make_hf(tmp_path, num_attention_heads=8, num_key_value_heads=4)
    mesh = sharding.make_mesh(fsdp=2, tensor=4)
    model = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    q = model.model.layers[0].self_attn.q_proj.weight[...]  # [D=64, N=8, H=8]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(32, 2, 8)}  # each device holds 1/8
    ids = np.random.default_rng(0).integers(0, 300, (2, 9))
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(ref, ids), atol=TOL, rtol=0)


# --- unhappy paths -----------------------------------------------------------------------


def test_missing_directory_and_files(tmp_path):
    from jaxalign.models import CheckpointError

    with pytest.raises(CheckpointError, match="no such directory"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json.*not found"):
        from_pretrained(tmp_path / "empty")
    path, _ = make_hf(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        from_pretrained(path)


def test_missing_shard_file(tmp_path):
    from jaxalign.models import CheckpointError

    _, ref = make_hf(tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: listed in .* but missing"):
        from_pretrained(tmp_path / "sharded")


def test_other_architecture_is_refused(tmp_path):
    from jaxalign.models import CheckpointError

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='llama'"):
        from_pretrained(tmp_path / "llama")


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    from jaxalign.models import CheckpointError

    path, _ = make_hf(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '.*mlp\.\w+_proj\.weight'"
        r" has shape .* implies",
    ):
        from_pretrained(path)


def test_truncated_safetensors(tmp_path):
    from jaxalign.models import CheckpointError

    path, _ = make_hf(tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(path)
    f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        from_pretrained(path)


def test_missing_tensor_untied_head(tmp_path):
    from jaxalign.models import CheckpointError

    path, _ = make_hf(tmp_path, tie_word_embeddings=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing .*lm_head\.weight"):
        from_pretrained(path)


def test_hub_id_without_network_gives_clear_error(monkeypatch):
    from jaxalign.models import CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        from_pretrained("Qwen/definitely-not-cached-jaxalign-test")


def test_bad_config_values():
    with pytest.raises(ValueError, match="attention_impl"):
        tiny(attention_impl="flash9")
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads"):
        tiny(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported"):
        tiny(rope_scaling={"rope_type": "longrope"})


# --- runtime variants --------------------------------------------------------------------


def test_attention_impls_and_remat_agree():
    cfg = tiny(tie_word_embeddings=False)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    base = init_model(cfg, seed=3)
    graphdef, state = nnx.split(base)
    ref = np.asarray(base(ids, mask))

    def loss(model):
        return jnp.mean(model(ids, mask) ** 2)

    ref_grad = nnx.grad(loss)(base)
    for variant in [
        dict(attention_impl="dot_product"),
        dict(remat="full"),
        dict(remat="save_dots"),
    ]:
        other = nnx.merge(nnx.graphdef(init_model(cfg.replace(**variant))), state)
        real = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(other(ids, mask))[real], ref[real], atol=1e-5)
        grads = nnx.grad(loss)(other)
        for a, b in zip(jax.tree.leaves(ref_grad), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bf16_compute_is_close_to_fp32():
    cfg = tiny()
    model = init_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    fp32 = np.asarray(model(ids))
    graphdef, state = nnx.split(model)
    bf16_model = nnx.merge(nnx.graphdef(init_model(cfg.replace(dtype=jnp.bfloat16))), state)
    out = bf16_model(ids)
    assert out.dtype == jnp.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out, np.float32), fp32, atol=0.05)


def test_jit_matches_eager():
    model = init_model(tiny(), seed=1)
    ids = np.arange(24).reshape(2, 12)
    eager = np.asarray(model(ids))
    jitted = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    np.testing.assert_allclose(jitted, eager, atol=1e-5)


@pytest.mark.parametrize("preset", [qwen2p5_math_1p5b, qwen2p5_0p5b])
def test_full_size_presets_shapes_only(preset):
    cfg = preset()
    model = abstract_model(cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == cfg.num_params()
    with torch.device("meta"):
        ref = transformers.Qwen2ForCausalLM(cfg.to_hf())
    ref_n = sum(p.numel() for p in ref.parameters())
    assert n == ref_n
    axes = param_logical_axes(model)
    assert axes["model.layers.0.self_attn.q_proj.weight"] == ("embed", "heads", "head_dim")
    assert axes["model.embed_tokens.weight"] == ("vocab", "embed")


def test_config_round_trips_through_hf(tmp_path):
    path, _ = make_hf(tmp_path, **CASES["rope_yarn"], bos_token_id=5, eos_token_id=7)
    model = from_pretrained(path)
    out = save_pretrained(model, tmp_path / "export")
    a = transformers.AutoConfig.from_pretrained(path).to_dict()
    b = transformers.AutoConfig.from_pretrained(out).to_dict()
    for key in (
        "rope_parameters",
        "eos_token_id",
        "bos_token_id",
        "hidden_size",
        "num_key_value_heads",
        "tie_word_embeddings",
        "max_position_embeddings",
    ):
        assert a[key] == b[key], key
    cfg = Qwen2Config.from_json_file(out / "config.json")
    assert cfg.rope_scaling["rope_type"] == "yarn"


def test_flops_per_token_counts_matmul_params():
    cfg = tiny(tie_word_embeddings=True)
    d, f, v, L, n, k, h = 64, 128, 1024, 2, 4, 2, 16
    per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f  # weights only
    biases = L * (n * h + 2 * k * h)
    forward = 2 * (L * per_layer + biases + d * v) + 4 * L * 10 * d
    assert cfg.flops_per_token(10, backward=False) == forward
    assert cfg.flops_per_token(10) == 3 * forward


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_attention_matches_xla_on_gpu():
    cfg = tiny(dtype=jnp.bfloat16, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 64))
    mask = np.ones_like(ids)
    mask[1, :17] = 0
    base = init_model(cfg, seed=0)
    state = nnx.state(base)
    ref = np.asarray(base(ids, mask), np.float32)
    fused = nnx.merge(nnx.graphdef(init_model(cfg.replace(attention_impl="cudnn"))), state)
    out = np.asarray(fused(ids, mask), np.float32)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=0.05)


# --- splash attention (TPU kernel, run here in Pallas' interpreter) ----------------------


def _splash_inputs():
    cfg = tiny(num_hidden_layers=1, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (4, 100)))
    # packed rows (two sequences and padding; one row full), lengths off the 128 tile
    seg = jnp.asarray(np.stack([np.r_[np.ones(40), 2 * np.ones(50), np.zeros(10)],
                                np.r_[np.ones(70), 2 * np.ones(30)],
                                np.r_[np.ones(100)],
                                np.r_[np.ones(10), 2 * np.ones(10), 3 * np.ones(60),
                                      np.zeros(20)]]).astype(np.int32))
    return cfg, ids, seg


def _splash_vs_xla(mesh=None):
    cfg, ids, seg = _splash_inputs()
    xla = init_model(cfg, seed=1)
    splash = nnx.merge(nnx.graphdef(init_model(cfg.replace(attention_impl="splash"))),
                       nnx.state(xla))

    def loss(model, seg):  # only real tokens count
        h = model.model(ids, segment_ids=seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, h, 0.0) ** 2)

    def run(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(sharding.traced_on(mesh, lambda st, s: nnx.value_and_grad(loss)(
            nnx.merge(graphdef, st), s)))
        if mesh is not None:
            state = sharding.shard_params(state, mesh)
        return fn(state, seg)

    (want, want_grad), (got, got_grad) = run(xla), run(splash)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(want_grad), jax.tree.leaves(got_grad), strict=True):
        # fp32, a loss of ~2e4: within 1e-4 of each gradient's largest entry (5e-5 seen)
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4 * scale)
    # padded (unpacked) rows: the padding mask becomes segment ids 0 / 1
    mask = np.ones((4, 100), bool)
    mask[0, :30] = False  # left padding
    mask[1, 60:] = False  # right padding
    real = mask
    np.testing.assert_allclose(np.asarray(splash.model(ids, mask))[real],
                               np.asarray(xla.model(ids, mask))[real], atol=1e-5)


def test_splash_attention_equals_the_masked_path_on_packed_and_padded_rows():
    _splash_vs_xla()


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices")
def test_splash_attention_runs_per_shard_on_a_mesh():
    _splash_vs_xla(sharding.make_mesh(data=1, fsdp=4, tensor=2))


def test_splash_attention_decodes_with_the_masked_path():
    cfg, ids, _ = _splash_inputs()
    xla = init_model(cfg, seed=1)
    splash = nnx.merge(nnx.graphdef(init_model(cfg.replace(attention_impl="splash"))),
                       nnx.state(xla))
    cache_x, cache_s = (KVCache.init(cfg, 4, 104) for _ in range(2))
    out_x, _ = xla.model(ids, cache=cache_x, fresh_cache=True)
    out_s, _ = splash.model(ids, cache=cache_s, fresh_cache=True)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_x), atol=1e-5)
