"""Copy probe: loads an lvpipe run's LLM into PyTorch and measures copying from context.

    python benches/peers/copy_probe.py RUN_DIR TOKENIZER_JSON [NOTES_JSONL]

Reads RUN_DIR/config.json and model.safetensors by their Hugging Face names
(Qwen2 layout: `llm.model.layers.N.self_attn.q_proj.weight`, ...), rebuilds
the decoder in PyTorch (RMSNorm, rotate-half RoPE at the run's base and partial rotary factor,
grouped-query attention, SwiGLU; the LM head or, when tied, the embedding)
and prints, on fresh synthetic text in the corpus's style:

- `ledger gap G`: share of the repeated codes of a code list predicted
  exactly (argmax), with G filler sentences between the two readings;
- `needle gap G`: share of single planted facts whose code is generated
  exactly after G filler sentences and "The secret code of NAME is";
- `roster kK first token`: share of recalls whose first code token is
  predicted among K facts;
- `code of N tokens`: share of single planted facts (4 filler sentences
  before the question) whose first code token is predicted, by how many
  tokens the code is (one-token codes are rare BPE merges);
- `layer L at gap G`: the attention of layer L's best head from the final
  " is" of the question to the code's first token: its probability and its
  logit above the median logit. An induction head gives a high logit at
  every gap.
- `head push, code of N tokens`: that head's own contribution to the
  logit of the code's first token, above the median token (single facts,
  4 filler sentences back), by the code's token count: whether the head
  copies what it attends to.

With HAYSTACK=LEN in the environment it also prints `haystack LEN, code of
N tokens`: needles found (the code generated exactly) in filler documents
of about LEN tokens built as `lvpipe eval` builds them, at depths 0 to 1,
split by the code's token count (120 needles; HAYSTACK_TRIALS to change).

With NOTES_JSONL (synth's notes.jsonl) it also prints the mean loss over
its first 30 notes: a check that the PyTorch model is the trained one
(it should match the run's metrics.jsonl). docs/trainer.md ("Why the tiny recipe is as it is").
"""
import os, sys, random, json, torch, torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
run, tokp = sys.argv[1], sys.argv[2]
cfg = json.load(open(run + '/config.json'))['model']
W = load_file(run + '/model.safetensors')
tok = Tokenizer.from_file(tokp)
H, NH, NKV = cfg['hidden'], cfg['heads'], cfg['kv_heads']; DH = H // NH; base = cfg['rope_base']
# partial_rotary_factor: only the first ROT / 2 pairs turn (lvpipe's layout)
ROT = int(DH * cfg.get('partial_rotary_factor', 1.0)) // 2 * 2
def g(n): return W['llm.' + n]
def rms(x, w): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
def rope(x, cos, sin):
    a, b = x[..., :DH // 2], x[..., DH // 2:]; return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
@torch.no_grad()
def logits(ids, att=None):
    t = len(ids); x = g('model.embed_tokens.weight')[torch.tensor(ids)]
    pos = torch.arange(t).float(); fr = 1.0 / (base ** (torch.arange(0, DH, 2).float() / ROT)); fr[ROT // 2:] = 0.0; ang = pos[:, None] * fr
    cos, sin = ang.cos(), ang.sin()
    for l in range(cfg['layers']):
        p = f'model.layers.{l}.'
        h = rms(x, g(p + 'input_layernorm.weight'))
        q = (h @ g(p + 'self_attn.q_proj.weight').T + g(p + 'self_attn.q_proj.bias')).view(t, NH, DH).transpose(0, 1)
        k = (h @ g(p + 'self_attn.k_proj.weight').T + g(p + 'self_attn.k_proj.bias')).view(t, NKV, DH).transpose(0, 1)
        v = (h @ g(p + 'self_attn.v_proj.weight').T + g(p + 'self_attn.v_proj.bias')).view(t, NKV, DH).transpose(0, 1)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = k.repeat_interleave(NH // NKV, 0); v = v.repeat_interleave(NH // NKV, 0)
        if att is None:
            y = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
        else:
            a = (q @ k.transpose(-1, -2)) / DH ** 0.5
            a = a.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float('-inf'))
            att[l] = a[:, -1]; y = a.softmax(-1) @ v; att[('out', l)] = y[:, -1]
        x = x + y.transpose(0, 1).reshape(t, H) @ g(p + 'self_attn.o_proj.weight').T
        h = rms(x, g(p + 'post_attention_layernorm.weight'))
        x = x + (F.silu(h @ g(p + 'mlp.gate_proj.weight').T) * (h @ g(p + 'mlp.up_proj.weight').T)) @ g(p + 'mlp.down_proj.weight').T
    x = rms(x, g('model.norm.weight'))
    head = W.get('llm.lm_head.weight', g('model.embed_tokens.weight'))
    return x @ head.T
S=["the old mill","a quiet river","the northern road","the village baker","a tall lighthouse","the morning train","the market square","a small garden","the city library","a wooden bridge","the harbour master","the hill farm"]
V=["stood near","looked over","was far from","was painted like","was older than","was quieter than","opened toward","was built beside","was seen from","was known for"]
T=["in the early spring","after the long rain","during the festival","before the winter came","when the bells rang","on most evenings","for many years","under a grey sky","at the end of the day","without any noise"]
N=["Alder","Brisa","Corvin","Delia","Emrys","Fenna","Galen","Hesper","Ilsa","Jory","Kestrel","Liora","Maren","Nilo","Orla","Perrin"]
def filler(): s=random.choice(S); return f"{s[0].upper()+s[1:]} {random.choice(V)} {random.choice(S)} {random.choice(T)}."
random.seed(5)
def enc(s): return tok.encode(s).ids
res = {}
# ledgers: accuracy over the repeated list tokens (after the first code token)
for gap in [0, 2, 20, 80]:
    hit = tot = 0
    for _ in range(20):
        codes = ' '.join(str(random.randint(1000, 9999)) for _ in range(random.randint(3, 10)))
        a = enc('The ledger reads ' + codes + '.'); fill = enc(''.join(' ' + filler() for _ in range(gap))); b = enc(' The ledger reads ' + codes + '.')
        ids = a + fill + b; lg = logits(ids); pre = len(enc(' The ledger reads'))
        for p in range(len(a) + len(fill) + pre, len(ids) - 1):
            tot += 1; hit += int(lg[p - 1].argmax() == ids[p])
    res[f'ledger gap {gap}'] = round(hit / tot, 3)
def needle():
    """A held-out needle as `lvpipe eval` draws it: the question (the fact's
    prefix up to " is") and the code."""
    name = random.choice(N) + str(random.randint(9000, 9999))
    return f'The secret code of {name} is', str(random.randint(1000, 9999))
def greedy(ids, n=3):
    """The text of `n` tokens generated greedily after `ids`."""
    out = []
    for _ in range(n):
        out.append(int(logits(ids + out)[-1].argmax()))
    return tok.decode(out)
def fact_and_question(gap, pre=3):
    """`pre` filler sentences, a fact, `gap` filler sentences, the question:
    its token ids, the position of the code's first token, and the code."""
    q, code = needle()
    head = ' '.join(filler() for _ in range(pre)) + ' ' + q
    text = head + f' {code}. ' + ' '.join(filler() for _ in range(gap)) + ' ' + q
    return enc(text), len(enc(head)), code
# single needle: fact, gap filler, prompt; exact code
for gap in [0, 2, 10, 40, 160]:
    hit = 0; n = 20
    for _ in range(n):
        ids, _, code = fact_and_question(gap)
        got = greedy(ids).strip().split('.')[0]
        hit += int(got == code)
    res[f'needle gap {gap}'] = hit / n
# roster with k facts, recall code accuracy (first code token)
for k in [2, 4]:
    hit = tot = 0
    for _ in range(20):
        facts = [(random.choice(N) + str(random.randint(0, 8999)), str(random.randint(1000, 9999))) for _ in range(k)]
        text = ' '.join(f'The secret code of {n} is {c}.' for n, c in facts) + ' ' + filler()
        n, c = random.choice(facts); ids = enc(text + f' The secret code of {n} is'); lg = logits(ids)
        tot += 1; hit += int(lg[-1].argmax() == enc(' ' + c)[0])
    res[f'roster k{k} first token'] = hit / tot
# first code token by the code's token count
by_len = {}
for _ in range(200):
    ids, at, code = fact_and_question(4); code = enc(' ' + code)
    hit = int(logits(ids)[-1].argmax()) == code[0]
    h, n = by_len.get(len(code), (0, 0)); by_len[len(code)] = (h + hit, n + 1)
for k in sorted(by_len):
    res[f'code of {k} tokens (n={by_len[k][1]})'] = round(by_len[k][0] / by_len[k][1], 3)
# attention from the question's " is" to the code's first token
for gap in [2, 40, 120]:
    probs, lifts = [], []
    for _ in range(10):
        ids, at, _ = fact_and_question(gap); att = {}; logits(ids, att)
        probs.append(torch.stack([att[l].softmax(-1)[:, at] for l in range(cfg['layers'])]))
        lifts.append(torch.stack([att[l][:, at] - att[l][:, :at].median(-1).values for l in range(cfg['layers'])]))
    p, lift = torch.stack(probs).mean(0), torch.stack(lifts).mean(0)
    for l in range(cfg['layers']):
        h = int(lift[l].argmax())
        res[f'layer {l} at gap {gap}'] = f'head {h}: p {p[l, h]:.2f}, logit +{lift[l, h]:.1f}'
# the best last-layer head's own push on the code's first token (its output
# times the tied embedding, above the median token), by the code's token count
l = cfg['layers'] - 1; Wo = g(f'model.layers.{l}.self_attn.o_proj.weight'); head = W.get('llm.lm_head.weight', g('model.embed_tokens.weight'))
by_len = {}
for _ in range(100):
    ids, at, code = fact_and_question(4); code = enc(' ' + code); att = {}; logits(ids, att)
    h = int(att[l].softmax(-1)[:, at].argmax())
    push = (att[('out', l)][h] @ Wo[:, h * DH:(h + 1) * DH].T) @ head.T
    by_len.setdefault(len(code), []).append(float(push[code[0]] - push.median()))
for k in sorted(by_len):
    res[f'head push, code of {k} tokens'] = round(sum(by_len[k]) / len(by_len[k]), 1)
# needles in filler documents of HAYSTACK tokens, by the code's token count
if os.environ.get('HAYSTACK'):
    length, by_len = int(os.environ['HAYSTACK']), {}
    for trial in range(int(os.environ.get('HAYSTACK_TRIALS', 120))):
        depth = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0][trial % 6]
        q, code = needle(); fact = f'{q} {code}.'
        budget, sents, used = length - len(enc(fact)) - len(enc(q)) - 2, [], 0
        while True:
            s = filler(); n = len(enc(' ' + s))
            if used + n > budget: break
            used += n; sents.append(s)
        sents.insert(round(len(sents) * depth), fact)
        # scored as lvpipe eval scores: the digits the answer starts with
        got = greedy(enc(' '.join(sents) + ' ' + q)).lstrip()
        hit = int(got[:len(got) - len(got.lstrip('0123456789'))] == code)
        k = len(enc(' ' + code)); h, n = by_len.get(k, (0, 0)); by_len[k] = (h + hit, n + 1)
    for k in sorted(by_len):
        res[f'haystack {length}, code of {k} tokens'] = f'{by_len[k][0]}/{by_len[k][1]}'
print(run, res)
if len(sys.argv) > 3:
    tot = n = 0
    for i, l in enumerate(open(sys.argv[3])):
        if i >= 30: break
        ids = enc(json.loads(l)['text'])[:512]
        lg = logits(ids); tot += F.cross_entropy(lg[:-1], torch.tensor(ids[1:]), reduction='sum').item(); n += len(ids) - 1
    print('mean loss on notes', tot / n)
