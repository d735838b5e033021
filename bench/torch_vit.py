"""PyTorch restatement of the original CIFAR ViT, as a timing worker.

Bench-only (needs ``torch`` and ``numpy``; never imports jax or this
package), so it can run under another interpreter than the JAX one:
``bench/bench_torch.py`` starts it as a subprocess
(``--torch-python /path/to/python``) and drives it over stdin/stdout, one
JSON object per line, so that PyTorch and JAX arms alternate in one run.

The model mirrors the original set-up in ``docs/design.md`` (and ``synstrip_vit.models.vit``):
patch embedding of non-overlapping ``p x p`` patches (a ``Linear`` on the
flattened patches, as the original), class token, learned positional
embedding, pre-LayerNorm encoder blocks ``x + attn(ln1(x))``,
``x + mlp(ln2(x))`` with the MLP ``Linear -> act -> Dropout -> Linear -> act
-> Dropout``, attention with separate q/k/v/out ``Linear`` layers written
with ``einsum`` + ``softmax`` as the original (logits scaled by
``1/sqrt(head_dim)``, as ours), head ``LayerNorm + Linear`` on the class
token, LayerNorm eps 1e-5, dropout 0. AdamW (lr 1e-3, weight decay 5e-5),
mean cross-entropy, ``zero_grad(set_to_none=True)``.

One timed step = (optionally) the same random crop (zero padding 4) + flip +
normalisation of a uint8 batch as ``synstrip_vit.data.random_crop_flip``,
vectorised with one gather, then forward, backward and the optimizer step.

Protocol (stdin -> stdout, one JSON object per line)::

  {"cmd": "init", "depth": 4, "hidden": 128, "heads": 4, "mlp": 512,
   "batch": 128, "threads": 2, "augment": true, "activation": "relu"}
      -> {"ok": true, "torch": "2.x", "threads": 2, "params": N}
  {"cmd": "time", "calls": 4, "warmup": 0} -> {"ok": true, "s_per_call": f}
  {"cmd": "quit"}

``python bench/torch_vit.py --selftest`` runs a few steps and prints the
throughput (no protocol).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)


class MultiHeadSelfAttention(nn.Module):
  def __init__(self, feats: int, heads: int):
    super().__init__()
    self.heads = heads
    self.q = nn.Linear(feats, feats)
    self.k = nn.Linear(feats, feats)
    self.v = nn.Linear(feats, feats)
    self.o = nn.Linear(feats, feats)
    self.scale = 1.0 / math.sqrt(feats // heads)

  def forward(self, x):
    b, n, f = x.shape
    h = self.heads
    q = self.q(x).view(b, n, h, f // h).transpose(1, 2)
    k = self.k(x).view(b, n, h, f // h).transpose(1, 2)
    v = self.v(x).view(b, n, h, f // h).transpose(1, 2)
    score = F.softmax(torch.einsum("bhif,bhjf->bhij", q, k) * self.scale,
                      dim=-1)
    attn = torch.einsum("bhij,bhjf->bihf", score, v)
    return self.o(attn.flatten(2))


class EncoderBlock(nn.Module):
  def __init__(self, feats, mlp, heads, act, dropout=0.0):
    super().__init__()
    self.ln1 = nn.LayerNorm(feats, eps=1e-5)
    self.msa = MultiHeadSelfAttention(feats, heads)
    self.ln2 = nn.LayerNorm(feats, eps=1e-5)
    self.mlp = nn.Sequential(
        nn.Linear(feats, mlp), act(), nn.Dropout(dropout),
        nn.Linear(mlp, feats), act(), nn.Dropout(dropout))

  def forward(self, x):
    x = x + self.msa(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
  def __init__(self, *, num_classes=10, img=32, channels=3, patch=4,
               hidden=384, depth=7, heads=8, mlp=1536, activation="relu"):
    super().__init__()
    act = {"relu": nn.ReLU, "gelu": nn.GELU}[activation]
    self.patch = patch
    n = (img // patch) ** 2
    self.emb = nn.Linear(patch * patch * channels, hidden)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
    self.pos_emb = nn.Parameter(torch.randn(1, n + 1, hidden) * 0.02)
    self.enc = nn.Sequential(*[EncoderBlock(hidden, mlp, heads, act)
                               for _ in range(depth)])
    self.fc = nn.Sequential(nn.LayerNorm(hidden, eps=1e-5),
                            nn.Linear(hidden, num_classes))

  def patches(self, x):  # [B, C, H, W] -> [B, (H/p)(W/p), p*p*C]
    p = self.patch
    b, c, _, _ = x.shape
    x = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, H/p, W/p, p, p]
    return x.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, p * p * c)

  def forward(self, x):
    x = self.emb(self.patches(x))
    x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)
    x = x + self.pos_emb
    x = self.enc(x)
    return self.fc(x[:, 0])


def crop_flip_normalize(images_u8, gen, padding=4):
  """Random crop (zero padding) + flip + normalisation: [B,H,W,C] u8 ->
  [B,C,H,W] f32, one gather for the whole batch."""
  b, h, w, c = images_u8.shape
  x = images_u8.permute(0, 3, 1, 2).float()
  if padding:
    x = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=gen)
    rows = off[0][:, None] + torch.arange(h)[None, :]  # [B, H]
    cols = off[1][:, None] + torch.arange(w)[None, :]  # [B, W]
  else:
    rows = torch.arange(h).expand(b, h)
    cols = torch.arange(w).expand(b, w)
  flip = torch.rand(b, generator=gen) < 0.5
  cols = torch.where(flip[:, None], cols.flip(1), cols)
  bi = torch.arange(b)[:, None, None]
  x = x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # BHWC
  mean = torch.tensor(CIFAR_MEAN)
  std = torch.tensor(CIFAR_STD)
  return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


class Trainer:
  def __init__(self, *, depth, hidden, heads, mlp, batch, threads=2,
               augment=True, activation="relu", seed=0):
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    self.model = ViT(hidden=hidden, depth=depth, heads=heads, mlp=mlp,
                     activation=activation)
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3,
                                 weight_decay=5e-5)
    rng = np.random.default_rng(0)
    self.images = torch.from_numpy(
        rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    self.labels = torch.from_numpy(
        rng.integers(0, 10, (batch,)).astype(np.int64))
    self.augment = augment
    self.gen = torch.Generator().manual_seed(seed)
    self.last_loss = None

  def step(self):
    if self.augment:
      x = crop_flip_normalize(self.images, self.gen)
    else:
      x = crop_flip_normalize(self.images, self.gen, padding=0)
    self.opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(self.model(x), self.labels)
    loss.backward()
    self.opt.step()
    self.last_loss = loss.item()

  def time(self, calls, warmup=0):
    for _ in range(warmup):
      self.step()
    t0 = time.perf_counter()
    for _ in range(calls):
      self.step()
    return (time.perf_counter() - t0) / calls


def serve():
  trainer = None
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg.pop("cmd")
    if cmd == "quit":
      break
    if cmd == "init":
      trainer = Trainer(**msg)
      reply = {"ok": True, "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "params": sum(p.numel() for p in trainer.model.parameters())}
    elif cmd == "time":
      reply = {"ok": True, "s_per_call": trainer.time(**msg),
               "loss": trainer.last_loss}
    else:
      reply = {"ok": False, "error": f"unknown command {cmd!r}"}
    print(json.dumps(reply), flush=True)


if __name__ == "__main__":
  if "--selftest" in sys.argv:
    t = Trainer(depth=4, hidden=128, heads=4, mlp=512, batch=128)
    s = t.time(5, warmup=2)
    print(f"torch {torch.__version__}: {128 / s:.0f} images/s "
          f"({1e3 * s:.0f} ms/step), loss {t.last_loss:.3f}")
  else:
    serve()
