#!/usr/bin/env python3
"""Write small self-made PyTorch checkpoints of one attention layer per layout, with an input
and PyTorch's own output of that layer, for `attn mha` (see Scripts/compare_mha_pytorch.py).

    /work/venv/bin/python Scripts/make_mha_checkpoints.py [--out .build/mha_compare]

Needs torch and safetensors; transformers for the bert and llama checkpoints (without it they
are skipped, and the script says so). Writes OUT/checkpoints/<layout>/:

  torch  model.safetensors  a small nn.Module (LayerNorm, nn.MultiheadAttention(E 64, H 8,
                            bias=True, batch_first=True) as `attn.`, a Linear), its state_dict;
                            key padding on batch 1 and a float attn_mask [T, T] (added)
  bert   model.safetensors  a tiny BertModel (2 layers, E 64, H 4, random init, seeded; the
         config.json        attention's biases and LayerNorm made non-trivial), saved whole with
                            save_pretrained: the layer is `encoder.layer.0.attention.`; key
                            padding on batch 1
  llama  model.safetensors  a tiny LlamaForCausalLM (2 layers, E 64, H 8, Hkv 2, D 8,
         config.json        rope_theta 500000), saved whole: `model.layers.0.self_attn.`;
                            causal, positions from 12

and in each folder: x.npy (<f4 [B, T, E]), the masks (.npy), y_torch.npy (<f4: the layer run in
float32 as PyTorch runs it), y_torch64.npy (<f8: the same weights run in float64; for llama
with cos/sin computed in float64, as attn does, where transformers computes them in float32),
weights_torch64.npy (<f8 [B, H, T, T], per-head attention weights, where PyTorch gives them),
case.json (the layer's description and the `attn mha` arguments). It prints the `attn mha`
command of each.

RoPE, all in float64: inv_freq[i] = theta^(-2i/D), angle = (offset + t)·inv_freq[i], "half"
layout (rotate_half), as transformers' LlamaAttention applies it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / ".build" / "mha_compare"
SEED = 20261201


def attn_args(case: dict, folder: Path, out_name="y_attn.npy", weights_name="w_attn.npy"):
    """The `attn mha` arguments (without the binary) that run `case` (a case.json dict) whose
    files are in `folder`."""
    f = lambda name: str(folder / name) if not Path(name).is_absolute() else name
    args = ["mha", "--weights", f(case["weights"]), "--layout", case["layout"]]
    if case["prefix"]:
        args += ["--prefix", case["prefix"]]
    args += ["--heads", str(case["heads"])]
    if case.get("kv_heads") and case["kv_heads"] != case["heads"]:
        args += ["--kv-heads", str(case["kv_heads"])]
    if case.get("rope_theta") is not None:
        args += ["--rope-theta", repr(float(case["rope_theta"]))]
    if case.get("position_offset"):
        args += ["--position-offset", str(case["position_offset"])]
    if case.get("layer_norm_eps") is not None:
        args += ["--layer-norm-eps", repr(float(case["layer_norm_eps"]))]
    args += ["--input", f(case["input"])]
    if case.get("key_padding_mask"):
        args += ["--key-padding-mask", f(case["key_padding_mask"])]
    if case.get("attn_mask"):
        args += ["--attn-mask", f(case["attn_mask"])]
    if case.get("is_causal"):
        args += ["--is-causal"]
    if out_name:
        args += ["--out", str(folder / out_name)]
    if weights_name:
        args += ["--weights-out", str(folder / weights_name)]
    return args


def command_line(case: dict, folder: Path, attn="attn") -> str:
    return " ".join(shlex.quote(a) for a in [attn] + attn_args(case, folder))


def rope_cos_sin64(torch, d, theta, offset, t, batch):
    """transformers-shaped (cos, sin) [B, T, D] computed in float64 (angles too)."""
    inv = 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(offset, offset + t, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], dim=-1)[None].expand(batch, t, d)
    return emb.cos(), emb.sin()


def hf_extended_mask(torch, kpm: np.ndarray | None, dtype):
    """transformers' additive [B, 1, 1, T] mask (0 / finfo.min) from key padding (True = pad)."""
    if kpm is None:
        return None
    m = torch.zeros(kpm.shape[0], 1, 1, kpm.shape[1], dtype=dtype)
    m[torch.from_numpy(kpm)[:, None, None, :]] = torch.finfo(dtype).min
    return m


def write_case(folder: Path, case: dict, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        np.save(folder / name, a, allow_pickle=False)
    (folder / "case.json").write_text(json.dumps(case, indent=2) + "\n")


# --------------------------------------------------------------------------------------------


def make_torch(torch, folder: Path) -> dict:
    from safetensors.torch import save_file
    nn = torch.nn
    E, H, B, T = 64, 8, 2, 16
    torch.manual_seed(SEED)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(E)
            self.attn = nn.MultiheadAttention(E, H, bias=True, batch_first=True)
            self.proj = nn.Linear(E, E)

    block = Block().eval()
    with torch.no_grad():  # nn.MultiheadAttention starts with zero biases: make them count
        block.attn.in_proj_bias.normal_(0.0, 0.1)
        block.attn.out_proj.bias.normal_(0.0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in block.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    x = torch.randn(B, T, E)
    kpm = np.zeros((B, T), dtype=bool)
    kpm[1, 11:] = True
    am = (torch.randn(T, T) * 0.5).float()  # float attn_mask, added (same in MHA and SDPA)
    outs, w64 = {}, None
    with torch.no_grad():
        for dt, key in ((torch.float32, "y_torch.npy"), (torch.float64, "y_torch64.npy")):
            mha = block.attn.to(dt)
            # key padding as a float mask (0 / -inf) of attn_mask's type, as PyTorch asks
            pad = torch.zeros(B, T, dtype=dt).masked_fill(torch.from_numpy(kpm), float("-inf"))
            y, w = mha(x.to(dt), x.to(dt), x.to(dt), key_padding_mask=pad,
                       attn_mask=am.to(dt), need_weights=True, average_attn_weights=False)
            outs[key] = y.numpy()
            if dt == torch.float64:
                w64 = w.numpy()
        block.attn.float()
    case = dict(name="torch_mha", layout="torch", prefix="attn.", weights="model.safetensors",
                embed_dim=E, heads=H, kv_heads=H, head_dim=E // H, rope_theta=None,
                position_offset=0, layer_norm_eps=None, input="x.npy",
                key_padding_mask="key_padding_mask.npy", attn_mask="attn_mask.npy",
                is_causal=False,
                description=f"nn.MultiheadAttention(E {E}, H {H}) in an nn.Module as `attn.`, "
                            f"B {B}, T {T}, key padding (batch 1 keys 11-15), float attn_mask "
                            "[T, T]",
                torch_float32="nn.MultiheadAttention, float32",
                torch_float64="nn.MultiheadAttention, float64")
    write_case(folder, case, {"x.npy": x.numpy(), "key_padding_mask.npy": kpm,
                              "attn_mask.npy": am.numpy(), "y_torch.npy": outs["y_torch.npy"],
                              "y_torch64.npy": outs["y_torch64.npy"],
                              "weights_torch64.npy": w64})
    return case


def randomize_bert_attention(torch, attention):
    """HF initializes biases to 0 and LayerNorm to (1, 0): make them non-trivial (seeded)."""
    with torch.no_grad():
        for lin in (attention.self.query, attention.self.key, attention.self.value,
                    attention.output.dense):
            lin.bias.normal_(0.0, 0.1)
        attention.output.LayerNorm.weight.normal_(1.0, 0.1)
        attention.output.LayerNorm.bias.normal_(0.0, 0.1)


def make_bert(torch, transformers, folder: Path) -> dict:
    from transformers import BertConfig, BertModel
    E, H, B, T = 64, 4, 2, 12
    torch.manual_seed(SEED + 1)
    cfg = BertConfig(vocab_size=100, hidden_size=E, num_hidden_layers=2, num_attention_heads=H,
                     intermediate_size=128, max_position_embeddings=64, layer_norm_eps=1e-12,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    model = BertModel(cfg).eval()
    for layer in model.encoder.layer:
        randomize_bert_attention(torch, layer.attention)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))  # config.json + model.safetensors
    x = torch.randn(B, T, E)
    kpm = np.zeros((B, T), dtype=bool)
    kpm[1, 8:] = True
    att = model.encoder.layer[0].attention
    outs, w64 = {}, None
    with torch.no_grad():
        for dt, key in ((torch.float32, "y_torch.npy"), (torch.float64, "y_torch64.npy")):
            att.to(dt)
            y, w = att(x.to(dt), attention_mask=hf_extended_mask(torch, kpm, dt))
            outs[key] = y.numpy()
            if dt == torch.float64:
                w64 = w.numpy()
        att.float()
    case = dict(name="bert_tiny", layout="bert", prefix="encoder.layer.0.attention.",
                weights="model.safetensors", embed_dim=E, heads=H, kv_heads=H, head_dim=E // H,
                rope_theta=None, position_offset=0, layer_norm_eps=1e-12, input="x.npy",
                key_padding_mask="key_padding_mask.npy", attn_mask=None, is_causal=False,
                description=f"BertModel (transformers {transformers.__version__}, random init), "
                            f"layer 0's BertAttention, E {E}, H {H}, B {B}, T {T}, key padding "
                            "(batch 1 keys 8-11)",
                torch_float32="BertAttention eager, float32",
                torch_float64="BertAttention eager, float64")
    write_case(folder, case, {"x.npy": x.numpy(), "key_padding_mask.npy": kpm,
                              "y_torch.npy": outs["y_torch.npy"],
                              "y_torch64.npy": outs["y_torch64.npy"], "weights_torch64.npy": w64})
    return case


def make_llama(torch, transformers, folder: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    E, H, HKV, B, T, THETA, OFFSET = 64, 8, 2, 2, 16, 500000.0, 12
    D = E // H
    torch.manual_seed(SEED + 2)
    cfg = LlamaConfig(vocab_size=100, hidden_size=E, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=H, num_key_value_heads=HKV, head_dim=D,
                      rope_theta=THETA, max_position_embeddings=256, attention_bias=False,
                      attention_dropout=0.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"  # eager takes the softmax in float32 even in float64
    model = LlamaForCausalLM(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    x = torch.randn(B, T, E)
    att = model.model.layers[0].self_attn
    causal = lambda dt: torch.full((T, T), float("-inf"), dtype=dt).triu(1)[None, None]
    pos = torch.arange(OFFSET, OFFSET + T)[None].expand(B, T)
    with torch.no_grad():
        # float32, as transformers runs it: its rotary embedding (float32 angles), SDPA.
        cs32 = model.model.rotary_emb(x, pos)
        y32, _ = att(x, position_embeddings=cs32, attention_mask=causal(torch.float32))
        att.to(torch.float64)
        x64 = x.to(torch.float64)
        cs64 = rope_cos_sin64(torch, D, THETA, OFFSET, T, B)
        y64, _ = att(x64, position_embeddings=cs64, attention_mask=causal(torch.float64))
        # Per-head weights in float64 from the module's own projections (eager would round the
        # softmax to float32).
        q = att.q_proj(x64).view(B, T, H, D).transpose(1, 2)
        k = att.k_proj(x64).view(B, T, HKV, D).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        q, k = apply_rotary_pos_emb(q, k, *cs64)
        k = k.repeat_interleave(H // HKV, dim=1)
        w64 = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5 + causal(torch.float64), dim=-1)
        att.float()
    case = dict(name="llama_tiny_gqa", layout="llama", prefix="model.layers.0.self_attn.",
                weights="model.safetensors", embed_dim=E, heads=H, kv_heads=HKV, head_dim=D,
                rope_theta=THETA, position_offset=OFFSET, layer_norm_eps=None, input="x.npy",
                key_padding_mask=None, attn_mask=None, is_causal=True,
                description=f"LlamaForCausalLM (transformers {transformers.__version__}, random "
                            f"init), layer 0's LlamaAttention, E {E}, H {H}, Hkv {HKV}, D {D}, "
                            f"rope_theta {THETA:g}, positions {OFFSET}.., causal, B {B}, T {T}",
                torch_float32="LlamaAttention sdpa, float32, transformers' rotary (float32 angles)",
                torch_float64="LlamaAttention sdpa, float64, cos/sin computed in float64")
    write_case(folder, case, {"x.npy": x.numpy(), "y_torch.npy": y32.numpy(),
                              "y_torch64.npy": y64.numpy(), "weights_torch64.npy": w64.numpy()})
    return case


def build_all(out: Path, quiet=False) -> tuple[list[tuple[dict, Path]], list[str]]:
    """Writes every checkpoint it can under out/checkpoints/; returns ([(case, folder)],
    [skipped parts, with the reason])."""
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = out / "checkpoints"
    made, skipped = [], []
    made.append((make_torch(torch, base / "torch"), base / "torch"))
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        transformers = None
        skipped += ["bert (needs transformers: pip install transformers)",
                    "llama (needs transformers: pip install transformers)"]
    if transformers is not None:
        made.append((make_bert(torch, transformers, base / "bert"), base / "bert"))
        made.append((make_llama(torch, transformers, base / "llama"), base / "llama"))
    return made, skipped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder; the checkpoints go to OUT/checkpoints/<layout>/ "
                             f"(default {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args()
    try:
        import torch  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        sys.exit(f"{e.name} is not installed: this script needs torch and safetensors "
                 "(e.g. /work/venv/bin/python)")
    made, skipped = build_all(args.out.resolve())
    for case, folder in made:
        y64 = np.load(folder / "y_torch64.npy")
        y32 = np.load(folder / "y_torch.npy")
        print(f"{case['layout']:<6} {folder}")
        print(f"       {case['description']}")
        print(f"       PyTorch float32 vs float64: worst |Δ| {np.abs(y32 - y64).max():.2e}")
        print(f"       {command_line(case, folder)}")
    for s in skipped:
        print(f"SKIPPED: {s}")


if __name__ == "__main__":
    main()
