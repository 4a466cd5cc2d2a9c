"""torch_gpt.py — an independent GPT-2 in PyTorch, the reference mtnlg is checked against.

Written from the architecture, not from mtnlg's code: pre-LayerNorm blocks
(x + attn(ln_1(x)), x + mlp(ln_2(x))), causal multi-head attention scaled by
1/sqrt(head size), GeLU with the tanh approximation, a final ln_f, and an LM
head tied to the token embedding (or with untie=True an output weight of its
own, lm_head.weight (V, C), as Megatron's --untie-embeddings-and-output-weights
and Hugging Face's tie_word_embeddings false); the loss is the cross-entropy averaged over
all B*T tokens. Weights carry Hugging Face GPT-2 names and Conv1D layouts
(h.N.attn.c_attn.weight is (C, 3C) and a layer computes x @ W + b).

Also a minimal safetensors reader/writer in pure Python (struct + json), so the
files the C side writes are read by code that shares nothing with it.
"""
import json
import math
import struct

import torch

_DTYPES = {  # safetensors dtype -> (torch dtype, bytes per element)
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
}
_NAMES = {v[0]: k for k, v in _DTYPES.items()}


def st_load(path, raw=False):
    """Returns ({name: tensor}, {metadata}) from a .safetensors file, the
    names without Hugging Face's "transformer." prefix (an untied export
    names its base model's tensors as GPT2LMHeadModel's state dict does,
    transformer.wte.weight beside lm_head.weight); raw: as in the file."""
    with open(path, "rb") as f:
        blob = f.read()
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > len(blob) - 8:
        raise ValueError(f"{path}: header length {hlen} beyond the file")
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    data = memoryview(blob)[8 + hlen:]
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        dtype, size = _DTYPES[e["dtype"]]
        a, b = e["data_offsets"]
        numel = math.prod(e["shape"])
        if b - a != numel * size or b > len(data):
            raise ValueError(f"{path}: tensor {name}: bad data_offsets {a, b}")
        t = torch.frombuffer(bytearray(data[a:b]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        if not raw and name.startswith("transformer."):
            name = name[len("transformer."):]
        if name in out:
            raise ValueError(f"{path}: tensor {name} twice (with and without 'transformer.')")
        out[name] = t.reshape(e["shape"]).clone()
    return out, meta


def st_save(path, tensors, metadata=None):
    """Writes {name: tensor} (any of the dtypes above) with string metadata."""
    header, chunks, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for c in chunks:
            f.write(c)


class Config:
    def __init__(self, n_layer, n_embd, n_head, vocab_size, seq):
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.vocab_size, self.seq = vocab_size, seq

    @classmethod
    def from_metadata(cls, meta):
        return cls(*(int(meta[k]) for k in ("n_layer", "n_embd", "n_head", "vocab_size", "seq")))

    def metadata(self):
        return {"format": "pt", "n_layer": self.n_layer, "n_embd": self.n_embd,
                "n_head": self.n_head, "vocab_size": self.vocab_size, "seq": self.seq}


def param_shapes(cfg, untie=False):
    """Hugging Face GPT-2 names and shapes, in the order of the state dict;
    untie: and the untied head's lm_head.weight (V, C), last."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.seq, C)}
    for l in range(cfg.n_layer):
        h = f"h.{l}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if untie:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as GPT-2
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def same(x):
    return x


def attention(x, w, b, wp, bp, n_head, keep=same, keep_grad=same, attn_mask=None):
    B, T, C = x.shape
    hs = C // n_head
    qkv = keep_grad(keep(x @ w + b))  # (B, T, 3C)
    q, k, v = qkv.split(C, dim=-1)
    q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if attn_mask is not None:  # (B, T, T), True where a row may attend
        causal = (causal & attn_mask).unsqueeze(1)  # (B, 1, T, T)
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = keep((att @ v).transpose(1, 2).reshape(B, T, C))
    return y @ wp + bp


def rounded_to(half):
    """keep= for forward: the value rounded to `half` and back (to nearest
    even, as mtnlg's pack_half), the gradient passed through unchanged."""
    def keep(x):
        return x + (x.to(half).to(x.dtype) - x).detach()
    return keep


class _GradientRounded(torch.autograd.Function):
    """Identity forward; backward, the gradient rounded to `half` and back."""

    @staticmethod
    def forward(ctx, x, half):
        ctx.half = half
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.half).to(g.dtype), None


def gradient_rounded_to(half):
    """keep_grad= for forward: the value unchanged, its gradient rounded to
    `half` (to nearest even) as mtnlg's 16-bit jobs store it."""
    def keep_grad(x):
        return _GradientRounded.apply(x, half)
    return keep_grad


def forward(p, cfg, idx, targets=None, keep=same, keep_grad=same, position_ids=None,
            attn_mask=None, untie=False):
    """p: {HF name: tensor}; idx, targets: (B, T) int64. Returns (logits, loss).
    keep: applied where mtnlg's blocks keep an activation for the backward
    pass (in a 16-bit job rounded there, rounded_to): Q/K/V, the attention
    output, the stream after attention, c_fc's output, and the stream
    between blocks (not after the last); and where a 16-bit job's GEMM input
    is made, as autocast rounds it: the LayerNorms' outputs and GeLU's.
    keep_grad: applied where a 16-bit job keeps a gradient in 16 bits
    (gradient_rounded_to): QKV's (attention's backward writes it so) and
    c_fc's output's, the GeLU's input.
    position_ids: (B, T) int64, each token's row of wpe (default 0..T-1);
    attn_mask: (B, T, T) bool, True where row t may attend to column j, and
    with the causal mask (default: causal only) — documents_of makes both;
    untie: the head is p["lm_head.weight"], not the token embedding."""
    B, T = idx.shape
    pos = position_ids if position_ids is not None else torch.arange(T)
    x = p["wte.weight"][idx] + p["wpe.weight"][pos]  # (B, T, C)
    for l in range(cfg.n_layer):
        h = f"h.{l}."
        a = keep(layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"]))
        x = keep(x + attention(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"],
                               p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"],
                               cfg.n_head, keep, keep_grad, attn_mask))
        m = keep(layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"]))
        m = keep(gelu_tanh(keep_grad(keep(m @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"]))))
        x = x + (m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"])
        if l < cfg.n_layer - 1:
            x = keep(x)
    x = keep(layer_norm(x, p["ln_f.weight"], p["ln_f.bias"]))
    head = p["lm_head.weight"] if untie else p["wte.weight"]  # (V, C)
    logits = x @ head.t()  # (B, T, V)
    loss = None
    if targets is not None:
        logp = logits.log_softmax(dim=-1)
        loss = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    return logits, loss


def random_weights(cfg, seed, untie=False):
    """fp32 weights: matrices N(0, 0.02); LayerNorm weights 1 + N(0, 0.1),
    every bias (LayerNorm and linear) N(0, 0.05), so every path of the backward
    pass carries a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in param_shapes(cfg, untie).items():
        r = torch.randn(shape, generator=g, dtype=torch.float64)
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            t = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            t = 0.05 * r
        else:
            t = 0.02 * r
        out[name] = t.to(torch.float32)
    return out


def decays(name, shape):
    """AdamW weight decay applies to 2-D tensors (matrices, wte, wpe, an
    untied lm_head) only."""
    return len(shape) == 2


def adamw64(weights, lr, wd, betas, eps):
    """The float64 copy of weights that trains, and torch's AdamW over it
    as mtnlgd's: decay wd on the 2-D tensors (decays), none on the rest.
    Returns (params {name: leaf tensor}, optimizer)."""
    p = {k: v.to(torch.float64).clone().requires_grad_(True) for k, v in weights.items()}
    groups = [{"params": [t for k, t in p.items() if decays(k, t.shape)], "weight_decay": wd},
              {"params": [t for k, t in p.items() if not decays(k, t.shape)],
               "weight_decay": 0.0}]
    return p, torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def documents_of(idx, eod):
    """Megatron's get_ltor_masks_and_position_ids with --reset-position-ids
    and --reset-attention-mask, for idx (B, T): (position_ids (B, T), mask
    (B, T, T) True where allowed, causal included). After an eod at i the
    positions start again at i + 1 and rows > i see no column <= i; the eod
    token itself belongs to the document it ends."""
    B, T = idx.shape
    pos = torch.arange(T).repeat(B, 1)
    mask = torch.ones(B, T, T, dtype=torch.bool).tril()
    for b in range(B):
        prev = 0
        for i in (idx[b] == eod).nonzero().flatten().tolist():
            mask[b, i + 1:, :i + 1] = False
            pos[b, i + 1:] -= i + 1 - prev
            prev = i + 1
    return pos, mask
