"""Train a tiny character-level language model.

An MLP reads the previous 8 bytes of text and predicts the next one.  The
text is Python's own documentation topics, shipped with CPython
(``pydoc_data``), so nothing is downloaded.  train_single.py is a plain
one-process PyTorch script; train_hvd.py is the same script with five lines
added to make it data-parallel (see README.md).
"""
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics

CONTEXT, BATCH, STEPS = 8, 64, 300

text = "".join(topics[k] for k in sorted(topics))[:200_000].encode("utf-8")
data = torch.tensor(list(text), dtype=torch.long)

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Embedding(256, 16),         # (B, CONTEXT) -> (B, CONTEXT, 16)
    torch.nn.Flatten(),                  # -> (B, CONTEXT * 16)
    torch.nn.Linear(CONTEXT * 16, 128),
    torch.nn.GELU(),
    torch.nn.Linear(128, 256),           # logits over the next byte
)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

for step in range(STEPS):
    starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,))
    x = data[starts[:, None] + torch.arange(CONTEXT)]  # (BATCH, CONTEXT)
    y = data[starts + CONTEXT]
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step == 0:
        print(f"first loss {loss.item():.4f}")

checksum = sum(p.double().sum().item() for p in model.parameters())
print(f"final loss {loss.item():.4f} param checksum {checksum:.10f}")
