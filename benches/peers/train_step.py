"""The same decoder and step as `cargo bench -p lvpipe-trainer --bench step`, in PyTorch eager.

    python benches/peers/train_step.py [THREADS]

4 layers, hidden 256, 4 heads (no GQA), SwiGLU MLP 1024, RMSNorm, RoPE,
q/k/v with bias, vocabulary 8192, untied head, fp32, AdamW, batch 4 x 512,
every token in the loss. Best and median of 10 steps after 2 warm-up steps.
"""

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
V, H, L, NH, FF, B, T = 8192, 256, 4, 4, 1024, 4, 512
DH = H // NH


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


def rope(x, cos, sin):
    x1, x2 = x[..., : DH // 2], x[..., DH // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = RMSNorm(H), RMSNorm(H)
        self.q, self.k, self.v = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)
        self.o = nn.Linear(H, H, bias=False)
        self.gate, self.up = nn.Linear(H, FF, bias=False), nn.Linear(H, FF, bias=False)
        self.down = nn.Linear(FF, H, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(b, t, NH, DH).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, H))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Layer() for _ in range(L))
        self.norm = RMSNorm(H)
        self.head = nn.Linear(H, V, bias=False)

    def forward(self, ids):
        pos = torch.arange(T, dtype=torch.float32)
        freq = 1.0 / (10000 ** (torch.arange(0, DH, 2, dtype=torch.float32) / DH))
        ang = pos[:, None] * freq[None]
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


model = Model()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
ids = (torch.arange(B * T).view(B, T) * 7919 % 8000)
times = []
for step in range(12):
    t0 = time.perf_counter()
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step >= 2:
        times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({
    "bench": "torch eager train step, 4 x 512 tokens, 4 layers d256", "torch": torch.__version__,
    "threads": torch.get_num_threads(), "best_s": round(times[0], 4), "median_s": round(times[len(times) // 2], 4),
    "tokens_per_s_best": round(B * T / times[0]), "tokens_per_s_median": round(B * T / times[len(times) // 2]),
    "loadavg": open("/proc/loadavg").read().strip(),
}))
