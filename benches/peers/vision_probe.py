"""Can the tiny recipe's vision tower learn the synthetic scenes, and through the LLM?

    python benches/peers/vision_probe.py RAW {linear,decoder} [LR] [STEPS] [POS_STD]

RAW is a `lvpipe synth --scale small` folder. The tower is recipes/tiny.toml's:
64 px, 8 px patches, width 64, 2 pre-norm blocks of 4 heads, post LayerNorm.
`linear` reads its 64 patch features with one linear layer per attribute;
`decoder` puts them through the mlp_downsample projector (16 tokens of 128)
into a 2-layer causal decoder that answers at the last position of
[bos, 16 media tokens, question, assistant], as the VLM does. Batch 32, one
question per image, AdamW, held-out accuracy per attribute every 100 steps.
POS_STD is the init std of the tower's position embedding (lvpipe: 1.0;
SigLIP's 1/sqrt(64) = 0.125). The decoder's token and position embeddings
start at std 0.02, as Qwen2's tokens (its RoPE adds no position to the
residual stream, so a tiny learned one stands in for it).
Images go through pad-to-square (grey) and a bilinear resize to 64 px as in
the shards. A PyTorch diagnostic only; lvpipe does not use it.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

torch.set_num_threads(2)
torch.manual_seed(0)
RAW = sys.argv[1].rstrip("/") + "/"
MODE = sys.argv[2] if len(sys.argv) > 2 else "linear"
LR = float(sys.argv[3]) if len(sys.argv) > 3 else 2e-3
STEPS = int(sys.argv[4]) if len(sys.argv) > 4 else 600
POS_STD = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right", "center"]
NUMBERS = {"one": 1, "two": 2, "three": 3}
# Answer class ids: colour 0-5, shape 6-8, count 9-11, position 12-16.
OFFSETS = torch.tensor([0, 6, 9, 12])
D, H = 64, 128


def pixels(path):
    im = Image.open(RAW + path).convert("RGB")
    w, h = im.size
    s = max(w, h)
    square = Image.new("RGB", (s, s), (127, 127, 127))
    square.paste(im, ((s - w) // 2, (s - h) // 2))
    x = np.asarray(square.resize((64, 64), Image.BILINEAR), dtype=np.float32)
    return (x / 127.5 - 1).transpose(2, 0, 1)


def label(colour, shape, count, position):
    return [COLOURS.index(colour), SHAPES.index(shape), count - 1, POSITIONS.index(position)]


answers = json.load(open(RAW + "answers.json"))
train = [d for d in answers["images"] if d["file"].startswith("images/")]
X = torch.tensor(np.stack([pixels(d["file"]) for d in train]))
Y = torch.tensor([label(d["colour"], d["shape"], d["count"], d["position"]) for d in train])
held = {}
for q in answers["eval_vqa"]:
    held.setdefault(q["image"], {})[q["attribute"]] = q["answer"]
files = sorted(held)
EX = torch.tensor(np.stack([pixels(f) for f in files]))
EY = torch.tensor(
    [label(a["colour"], a["shape"], NUMBERS[a["count"]], a["position"]) for a in (held[f] for f in files)]
)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask=None):
        h = self.n1(x)
        x = x + self.att(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.n2(x))


class Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 8, 8)
        self.pos = nn.Parameter(torch.randn(64, D) * POS_STD)
        self.blocks = nn.ModuleList(Block(D, 4) for _ in range(2))
        self.post = nn.LayerNorm(D)
        if MODE == "linear":
            self.heads = nn.ModuleList(nn.Linear(64 * D, 17) for _ in range(4))
            return
        self.proj = nn.Sequential(nn.LayerNorm(4 * D), nn.Linear(4 * D, H), nn.GELU(), nn.Linear(H, H))
        self.embed = nn.Embedding(8, H)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.text_pos = nn.Parameter(torch.randn(19, H) * 0.02)
        self.llm = nn.ModuleList(Block(H, 4) for _ in range(2))
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, 17, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((19, 19), float("-inf")), 1))

    def forward(self, x, question):
        n = x.shape[0]
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.post(x)
        if MODE == "linear":
            return torch.stack([h(x.flatten(1)) for h in self.heads], 1)[torch.arange(n), question]
        x = x.view(n, 4, 2, 4, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(n, 16, 4 * D)
        token = lambda k: self.embed(torch.full((n, 1), k))
        seq = torch.cat([token(0), self.proj(x), self.embed(question[:, None] + 2), token(1)], 1)
        seq = seq + self.text_pos
        for block in self.llm:
            seq = block(seq, self.mask)
        return self.head(self.norm(seq[:, -1]))


model = Probe()
opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
start = time.time()
for step in range(STEPS + 1):
    if step % 100 == 0:
        with torch.no_grad():
            acc = []
            for a in range(4):
                out = model(EX, torch.full((len(EX),), a))
                acc.append(round((out.argmax(1) == EY[:, a] + OFFSETS[a]).float().mean().item(), 2))
        print(json.dumps({"step": step, "colour": acc[0], "shape": acc[1], "count": acc[2],
                          "position": acc[3], "s": round(time.time() - start)}), flush=True)
    idx = torch.randint(0, len(X), (32,))
    question = torch.randint(0, 4, (32,))
    target = Y[idx].gather(1, question[:, None])[:, 0] + OFFSETS[question]
    loss = F.cross_entropy(model(X[idx], question), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
