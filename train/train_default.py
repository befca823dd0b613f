"""Train glmrt's embedded default: a small GLM-4-0414 (real architecture: sandwich norms,
partial interleaved RoPE, GQA, q/k/v bias) on Python's own documentation (pydoc_data, shipped
with Python), laid out as chat turns in the GLM-4 template, so that it answers a question
about a Python keyword with text from its docs.

Reproducible: fixed seeds, CPU, torch + transformers (the `dev` extra), on
2 cores (about 15 minutes). Writes the checkpoint in the published layout (sharded bf16 safetensors + index,
config, generation config, tokenizer files, chat template) and `heldout.txt` (the last tenth
of every topic, never trained on) for `glmrt eval`.

    python3 train/train_default.py --out models/glm4-pydoc
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

VOCAB = 2048
SEQ = 256
SIZES = dict(vocab_size=VOCAB + 64, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=48,
             max_position_embeddings=1024, attention_bias=True)
HELDOUT = 0.1
CHUNK_CHARS = 600


def question(topic: str, part: int) -> str:
    name = topic.replace("-", " ")
    return f"What is {name} in Python?" if part == 0 else f"Tell me more about {name} (part {part + 1})."


def split_topics():
    """{topic: (train text, held-out text)}: the last tenth of each topic is held out."""
    from pydoc_data.topics import topics
    out = {}
    for key in sorted(topics):
        text = topics[key].strip()
        cut = text.rfind("\n", 0, int(len(text) * (1 - HELDOUT)))
        cut = cut if cut > 0 else int(len(text) * (1 - HELDOUT))
        out[key] = (text[:cut].strip(), text[cut:].strip())
    return out


def chunks(text: str) -> list[str]:
    """~CHUNK_CHARS pieces cut at paragraph (or line) boundaries."""
    parts, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > CHUNK_CHARS:
            parts.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        parts.append(cur)
    return parts


def examples(tok, split) -> list[list[int]]:
    """Each example: one conversation rendered as the GLM-4 template does, tokenized."""
    out = []
    for key, (train, _) in split.items():
        for j, answer in enumerate(chunks(train)):
            text = f"[gMASK]<sop><|user|>\n{question(key, j)}<|assistant|>\n{answer}<|user|>"
            out.append(tok.encode(text, add_special_tokens=False).ids[:SEQ + 1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/glm4-pydoc")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import Glm4Config, Glm4ForCausalLM

    from glmrt.export.synthetic import STOP_TOKENS, hf_config, make_tokenizer, write_tokenizer_files

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    split = split_topics()
    tok = make_tokenizer(VOCAB, [train for train, _ in split.values()])
    ids = {t: tok.token_to_id(t) for t in STOP_TOKENS}
    pad = ids["<|endoftext|>"]
    data = examples(tok, split)
    raw_cfg = hf_config(SIZES, list(ids.values()), pad, "4.5x")
    model = Glm4ForCausalLM(Glm4Config(**raw_cfg))
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.epochs * math.ceil(len(data) / args.batch)
    print(f"{len(data)} examples, {n_params / 1e6:.2f}M parameters, {steps} steps", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    model.train()
    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        order = list(range(len(data)))
        random.shuffle(order)
        for b in range(0, len(order), args.batch):
            batch = [data[i] for i in order[b:b + args.batch]]
            width = max(len(x) for x in batch)
            x = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, seq in enumerate(batch):
                x[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            labels = x.masked_fill(mask == 0, -100)
            loss = model(input_ids=x, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"step {step}/{steps} epoch {epoch} loss {loss.item():.3f} "
                      f"{time.time() - t0:.0f}s", flush=True)

    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size="3MB")
    # the published checkpoints' config layout (transformers 4.5x) and generation config
    (tmp / "config.json").write_text(json.dumps(raw_cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": list(ids.values()), "pad_token_id": pad, "do_sample": False}, indent=2))
    write_tokenizer_files(tmp, tok, "glm4", "file", SIZES["max_position_embeddings"])
    (tmp / "heldout.txt").write_text("\n\n".join(h for _, h in split.values()) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
