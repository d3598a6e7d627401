"""The LLaDA adapter computes the same function as a from-scratch LLaDA forward (tiny random weights)."""

import json
import math

import torch

from paradecode.diffusion.llada import from_llada_weights, load_llada
from paradecode.diffusion.model import BlockKVCache

CFG = {"d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 48,
       "vocab_size": 50, "embedding_size": 50, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
       "mask_token_id": 49, "eos_token_id": 48, "max_sequence_length": 64, "weight_tying": False,
       "include_bias": False, "block_type": "llama"}


def llada_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, I, V = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"model.transformer.wte.weight": r(V, H), "model.transformer.ln_f.weight": 1 + r(H),
         "model.transformer.ff_out.weight": r(V, H)}
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "attn_out"):
            w[b + n + ".weight"] = r(H, H)
        w[b + "ff_proj.weight"], w[b + "up_proj.weight"], w[b + "ff_out.weight"] = r(I, H), r(I, H), r(H, I)
        w[b + "attn_norm.weight"], w[b + "ff_norm.weight"] = 1 + r(H), 1 + r(H)
    return w


def reference_llada(cfg, w, ids):
    """LLaDA's layer math written out: RMSNorm, q/k/v, RoPE, full (non-causal) softmax attention,
    attn_out residual, RMSNorm, act(ff_proj) * up_proj, ff_out residual, ln_f, ff_out head."""
    H, nh = cfg["d_model"], cfg["n_heads"]
    hs, eps, T = H // nh, cfg["rms_norm_eps"], ids.shape[1]

    def rms(x, wt):
        return wt * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hs, 2).float() / hs))
    f = torch.outer(torch.arange(T).float(), inv)
    pos = torch.cat([f, f], dim=-1)                                   # (T, hs)

    def rope(t):                                                      # (B, nh, T, hs)
        x1, x2 = t.view(*t.shape[:-1], 2, hs // 2).unbind(-2)
        return t * pos.cos() + torch.cat([-x2, x1], dim=-1) * pos.sin()

    x = w["model.transformer.wte.weight"][ids]
    B = ids.shape[0]
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q, k, v = (( h @ w[b + n + ".weight"].T).view(B, T, nh, hs).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H) @ w[b + "attn_out.weight"].T
        h = rms(x, w[b + "ff_norm.weight"])
        m = torch.nn.functional.silu(h @ w[b + "ff_proj.weight"].T) * (h @ w[b + "up_proj.weight"].T)
        x = x + m @ w[b + "ff_out.weight"].T
    return rms(x, w["model.transformer.ln_f.weight"]) @ w["model.transformer.ff_out.weight"].T


def test_llada_adapter_matches_reference_forward():
    w = llada_weights(CFG)
    model = from_llada_weights(CFG, w)
    ids = torch.randint(0, 49, (2, 11), generator=torch.Generator().manual_seed(1))
    ids[:, 6:] = CFG["mask_token_id"]
    got, _ = model.forward(ids)
    torch.testing.assert_close(got, reference_llada(CFG, w, ids), rtol=1e-4, atol=1e-4)
    assert model.shape.mask_id == 49


def test_llada_directory_loading_and_default_mask_id(tmp_path):
    from safetensors.torch import save_file

    cfg = {k: v for k, v in CFG.items() if k != "mask_token_id"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    w = llada_weights(cfg, seed=3)
    save_file(w, str(tmp_path / "model.safetensors"))
    model = load_llada(tmp_path, max_context=64)
    assert model.shape.mask_id == 126336
    ids = torch.randint(0, 48, (1, 9))
    torch.testing.assert_close(model.forward(ids)[0], reference_llada(cfg, w, ids), rtol=1e-4, atol=1e-4)


def test_caches_on_llada_shaped_model_are_exact_when_nothing_changed():
    model = from_llada_weights(CFG, llada_weights(CFG, seed=5))
    x = torch.randint(0, 49, (2, 16), generator=torch.Generator().manual_seed(2))
    x[:, 8:] = CFG["mask_token_id"]
    for mode in ("prefix", "dual"):
        cache = BlockKVCache(model, mode)
        full = cache.refresh(x, (8, 12))
        torch.testing.assert_close(cache.step(x), full, rtol=1e-5, atol=1e-5)


# -- bad input on the CLI: one line naming the problem and the fix, exit 2, no traceback ---------------
def test_cli_llada_refuses_a_llama_directory(capsys, tmp_path):
    from safetensors.torch import save_file
    from test_cli import assert_one_line_error, run_cli

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    code, _, err = run_cli(capsys, "diffusion", "generate", "1 2 3", "--llada", str(tmp_path))
    assert_one_line_error(code, err, "not a LLaDA checkpoint", "'d_model'", "'llama'", "paradecode generate")


def test_cli_llada_refuses_broken_files(capsys, tmp_path):
    from safetensors.torch import save_file
    from test_cli import assert_one_line_error, run_cli

    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"xx")
    code, _, err = run_cli(capsys, "diffusion", "generate", "1 2 3", "--llada", str(tmp_path))
    assert_one_line_error(code, err, "config.json", "JSON")
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    code, _, err = run_cli(capsys, "diffusion", "generate", "1 2 3", "--llada", str(tmp_path))
    assert_one_line_error(code, err, "model.safetensors", "not a whole safetensors file")
    save_file(llada_weights(CFG), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**CFG, "d_model": 64, "mlp_hidden_size": 96}))
    code, _, err = run_cli(capsys, "diffusion", "generate", "1 2 3", "--llada", str(tmp_path))
    assert_one_line_error(code, err, "do not match their config.json", "size mismatch")


def test_cli_llada_with_weights_is_refused(capsys, tmp_path):
    """--weights names the task model; with --llada it used to be ignored without a word."""
    from test_cli import assert_one_line_error, run_cli

    code, _, err = run_cli(capsys, "diffusion", "generate", "1 2 3", "--llada", str(tmp_path),
                           "--weights", str(tmp_path / "w.safetensors"))
    assert_one_line_error(code, err, "--llada", "--weights", "only one")
