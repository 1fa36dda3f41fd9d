"""Multi-query associative recall (MQAR), the synthetic recall task Based was designed for.

One sequence: ``num_kv_pairs`` key-value pairs, then queries, each an earlier key followed by
its value:

    k1 v1 k2 v2 ... kn vn | q1 a1 q2 a2 ...     (a_i = the value paired with key q_i)

Keys are distinct within a sequence (drawn from the lower half of the vocabulary, token 0
excluded: it pads an odd tail), values from the upper half. As a language-model batch the
model reads ``seq[:-1]`` and predicts ``seq[1:]``; the loss and the accuracy count only the
answer positions (where the input token is a query key), every other target is ``IGNORE``.
"""
from __future__ import annotations

import torch

IGNORE = -100
PAD = 0


def mqar_batch(batch: int, seq_len: int, vocab_size: int, num_kv_pairs: int,
               generator: torch.Generator | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids [batch, seq_len], targets [batch, seq_len]) of MQAR sequences.

    ``seq_len`` is the model's input length; the context takes ``2 * num_kv_pairs`` tokens
    and the queries fill the rest ((seq_len + 1 - 2 * num_kv_pairs) // 2 of them, at least 1).
    """
    if vocab_size < 5:
        raise ValueError(f"vocab_size must be >= 5, got {vocab_size}")
    num_keys = (vocab_size - 1) // 2                           # keys: 1 .. num_keys; values: the rest
    if not 1 <= num_kv_pairs <= num_keys:
        raise ValueError(f"num_kv_pairs must be in [1, {num_keys}] for vocab_size={vocab_size}, "
                         f"got {num_kv_pairs}")
    num_queries = (seq_len + 1 - 2 * num_kv_pairs) // 2
    if num_queries < 1:
        raise ValueError(f"seq_len must be >= 2 * num_kv_pairs + 1 = {2 * num_kv_pairs + 1} to leave room "
                         f"for a query, got {seq_len}")
    g = generator
    # distinct keys per row: the first num_kv_pairs of a random permutation of the key range
    keys = torch.rand(batch, num_keys, generator=g).argsort(dim=1)[:, :num_kv_pairs] + 1      # [B, n]
    values = torch.randint(num_keys + 1, vocab_size, (batch, num_kv_pairs), generator=g)      # [B, n]
    which = torch.randint(0, num_kv_pairs, (batch, num_queries), generator=g)                 # [B, q]
    query_keys = keys.gather(1, which)                                                        # [B, q]
    answers = values.gather(1, which)                                                         # [B, q]

    context = torch.stack([keys, values], dim=2).flatten(1)                                   # [B, 2n]
    queries = torch.stack([query_keys, answers], dim=2).flatten(1)                            # [B, 2q]
    seq = torch.cat([context, queries], dim=1)                                                # [B, 2n + 2q]
    pad = seq_len + 1 - seq.shape[1]                                                          # 0 or 1
    seq = torch.cat([seq, seq.new_full((batch, pad), PAD)], dim=1)                            # [B, seq_len + 1]

    input_ids = seq[:, :-1].clone()
    targets = torch.full_like(input_ids, IGNORE)
    answer_pos = 2 * num_kv_pairs + 2 * torch.arange(num_queries)                             # query keys
    targets[:, answer_pos] = answers
    return input_ids.to(device), targets.to(device)


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of answer positions (targets != IGNORE) whose argmax prediction is right."""
    mask = targets != IGNORE
    if not mask.any():
        raise ValueError("targets has no answer position (all IGNORE)")
    right = (logits.argmax(dim=-1) == targets) & mask
    return right.sum().item() / mask.sum().item()
