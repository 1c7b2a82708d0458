"""Induction probe: how many tokens the tiny recipe's decoder needs to learn retrieval.

    python benches/peers/induction_probe.py tokenizer=demo/raw/tokenizer.json [key=value ...]

The decoder of recipes/tiny.toml (2 layers, hidden 128, 4 heads over 2 KV
heads, SwiGLU 256, RMSNorm, RoPE, vocabulary 4096) in PyTorch, trained from
scratch on packed 512-token rows of synthetic documents in the corpus's
style, with a block-causal mask per document. Every 25 steps it prints the
share of retrieval targets predicted exactly (argmax) in that window:

- recall documents (default): filler sentences with `k` planted facts
  "The secret code of NAME is CODE." each repeated later; the target is the
  code token of the repeat (only retrievable from the first mention);
- `rep=P`: a share P of documents is instead a list of codes repeated
  verbatim ("The ledger reads 4821 1234 ..."): every token of the repeat is
  an induction target (the dense signal).

Options: lr (5e-4), steps (400), b rows per step (8), k facts per document
("1,4"), fill filler sentences ("8,24"), codes range ("1000,9999"), rep (0),
rmin/rmax codes per ledger ("8,40"), rfill filler between ledgers (6),
layers (2), seed (1), tie (0: untied LM head; 1: tied to the embedding),
base (RoPE, 10000), init (normal: every matrix normal(0, 0.02) as Qwen2's
initializer_range; uniform: PyTorch's +-1/sqrt(fan_in) as lvpipe without
`initializer_range`; uniform-attn / uniform-mlp / uniform-vo: only q, k,
v, o, only the MLP, or everything but q and k that way), std and estd (0.02: the normal draw's std for the
matrices and for the embedding). docs/trainer.md ("Why the tiny recipe is as it is") has the runs.
"""

import random
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

torch.set_num_threads(2)
args=dict(a.split('=') for a in sys.argv[1:])
LR=float(args.get('lr','5e-4')); STEPS=int(args.get('steps','400')); KF=args.get('k','1,4'); FILL=args.get('fill','8,24')
B=int(args.get('b','8')); T=512; SEED=int(args.get('seed','1')); L=int(args.get('layers','2'))
kmin,kmax=map(int,KF.split(',')); fmin,fmax=map(int,FILL.split(','))
random.seed(SEED); torch.manual_seed(SEED)
tok=Tokenizer.from_file(args['tokenizer'])
S=["the old mill","a quiet river","the northern road","the village baker","a tall lighthouse","the morning train","the market square","a small garden","the city library","a wooden bridge","the harbour master","the hill farm"]
Vb=["stood near","looked over","was far from","was painted like","was older than","was quieter than","opened toward","was built beside","was seen from","was known for"]
Tl=["in the early spring","after the long rain","during the festival","before the winter came","when the bells rang","on most evenings","for many years","under a grey sky","at the end of the day","without any noise"]
N=["Alder","Brisa","Corvin","Delia","Emrys","Fenna","Galen","Hesper","Ilsa","Jory","Kestrel","Liora","Maren","Nilo","Orla","Perrin"]
def filler(): s=random.choice(S); return f"{s[0].upper()+s[1:]} {random.choice(Vb)} {random.choice(S)} {random.choice(Tl)}."
def fact(n,c): return f"The secret code of {n} is {c}."
def doc():
    k=random.randint(kmin,kmax)
    sents=[(filler(),None) for _ in range(random.randint(fmin,fmax))]
    facts=[(random.choice(N)+str(random.randint(0,8999)), str(random.randint(CLO,CHI))) for _ in range(k)]
    for nm,c in facts: sents.insert(random.randint(0,len(sents)),(fact(nm,c),None))
    for nm,c in random.sample(facts,k): sents.insert(random.randint(len(sents)//2,len(sents)),(fact(nm,c),'R'))
    ids=[];tgt=[]
    for i,(s,r) in enumerate(sents):
        e=tok.encode((' ' if i else '')+s).ids
        if r: tgt.append(len(ids)+len(e)-2)  # position of code token (before '.')
        ids+=e
    return ids,tgt
CLO,CHI=map(int,args.get('codes','1000,9999').split(','))
REP=float(args.get('rep','0'))
def repdoc():
    n=random.randint(int(args.get('rmin','8')),int(args.get('rmax','40'))); codes=[str(random.randint(CLO,CHI)) for _ in range(n)]
    a=tok.encode('The ledger reads '+' '.join(codes)+'.').ids
    fill=[]
    for _ in range(random.randint(0,int(args.get('rfill','6')))): fill+=tok.encode(' '+filler()).ids
    b=tok.encode(' The ledger reads '+' '.join(codes)+'.').ids
    pre=len(tok.encode(' The ledger reads').ids)
    return a+fill+b,list(range(len(a)+len(fill)+pre,len(a)+len(fill)+len(b)-1))
def batch():
    X=torch.zeros(B,T,dtype=torch.long); M=[]; seg=torch.zeros(B,T,dtype=torch.long); pos=torch.zeros(B,T,dtype=torch.long)
    for b in range(B):
        n=0;sid=0
        while True:
            ids,tg=repdoc() if random.random()<REP else doc()
            if n+len(ids)>T: break
            X[b,n:n+len(ids)]=torch.tensor(ids); seg[b,n:n+len(ids)]=sid+1; pos[b,n:n+len(ids)]=torch.arange(len(ids))
            M+=[(b,n+t) for t in tg]; n+=len(ids); sid+=1
    return X,M,seg,pos
V,H,NH,NKV,FF=4096,128,4,2,256; DH=H//NH
class RMS(nn.Module):
    def __init__(s,d): super().__init__(); s.w=nn.Parameter(torch.ones(d))
    def forward(s,x): return x*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+1e-6)*s.w
def rope(x,cos,sin):
    x1,x2=x[...,:DH//2],x[...,DH//2:]; return torch.cat([x1*cos-x2*sin,x2*cos+x1*sin],-1)
class Layer(nn.Module):
    def __init__(s):
        super().__init__(); s.n1,s.n2=RMS(H),RMS(H)
        s.q=nn.Linear(H,H); s.k=nn.Linear(H,NKV*DH); s.v=nn.Linear(H,NKV*DH); s.o=nn.Linear(H,H,bias=False)
        s.g=nn.Linear(H,FF,bias=False); s.u=nn.Linear(H,FF,bias=False); s.d=nn.Linear(FF,H,bias=False)
    def forward(s,x,cos,sin,mask):
        b,t,_=x.shape; h=s.n1(x)
        q=s.q(h).view(b,t,NH,DH).transpose(1,2); k=s.k(h).view(b,t,NKV,DH).transpose(1,2); v=s.v(h).view(b,t,NKV,DH).transpose(1,2)
        q,k=rope(q,cos,sin),rope(k,cos,sin); k=k.repeat_interleave(NH//NKV,1); v=v.repeat_interleave(NH//NKV,1)
        y=F.scaled_dot_product_attention(q,k,v,attn_mask=mask)
        x=x+s.o(y.transpose(1,2).reshape(b,t,H)); h=s.n2(x); return x+s.d(F.silu(s.g(h))*s.u(h))
class Model(nn.Module):
    def __init__(s):
        super().__init__(); s.e=nn.Embedding(V,H); s.ls=nn.ModuleList(Layer() for _ in range(L)); s.n=RMS(H); s.h=nn.Linear(H,V,bias=False)
        for n,p in s.named_parameters():
            if p.dim()!=2: continue
            init=args.get('init','normal')
            if not n.startswith('e.') and (init=='uniform' or init=='uniform-mlp' and n.split('.')[-2] in 'gud' or init=='uniform-attn' and n.split('.')[-2] in 'qkvo' or init=='uniform-vo' and n.split('.')[-2] in 'gudvo'):
                nn.init.uniform_(p,-p.shape[1]**-0.5,p.shape[1]**-0.5)  # lvpipe's: +-1/sqrt(fan_in)
            else: nn.init.normal_(p,std=float(args.get('estd' if n.startswith('e.') else 'std','0.02')))
        if args.get('tie','0')=='1': s.h.weight=s.e.weight
    def forward(s,ids,seg,pos,base=float(args.get('base','10000'))):
        freq=1.0/(base**(torch.arange(0,DH,2).float()/DH)); ang=pos[...,None].float()*freq; cos,sin=ang.cos()[:,None],ang.sin()[:,None]
        t=ids.shape[1]; causal=torch.ones(t,t,dtype=torch.bool).tril()
        mask=(causal[None]&(seg[:,:,None]==seg[:,None,:]))[:,None]
        x=s.e(ids)
        for l in s.ls: x=l(x,cos,sin,mask)
        return s.h(s.n(x))
m=Model(); opt=torch.optim.AdamW(m.parameters(),lr=LR,weight_decay=0.01,betas=(0.9,0.95))
t0=time.time(); hits=0; tot=0; ntok=0
for step in range(1,STEPS+1):
    lr=LR*min(1,step/20); 
    for g in opt.param_groups: g['lr']=lr
    X,M,seg,pos=batch()
    lg=m(X,seg,pos); valid=(seg[:,1:]>0)&(seg[:,1:]==seg[:,:-1])
    loss=F.cross_entropy(lg[:,:-1].reshape(-1,V),X[:,1:].reshape(-1),reduction='none').view(B,T-1)
    loss=(loss*valid).sum()/valid.sum(); ntok+=int(valid.sum())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(),1.0); opt.step()
    with torch.no_grad():
        for b,p in M:
            tot+=1; hits+=int(lg[b,p-1].argmax()==X[b,p])
    if step%25==0:
        print(f"step {step} tok {ntok} loss {loss.item():.3f} recall_acc {hits/max(tot,1):.3f} ({tot}) {time.time()-t0:.0f}s",flush=True); hits=tot=0
