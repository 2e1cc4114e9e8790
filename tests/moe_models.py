"""The tiny Mixtral the mixture-of-experts tests share (transformers' 3-D ``MixtralExperts`` run by the
``grouped_mm`` experts implementation): 2 layers, hidden 32, intermediate 48, 4 experts, top-2."""

from __future__ import annotations

import torch

H, I, E, K, V = 32, 48, 4, 2, 64  # noqa: E741  (hidden, intermediate, experts, top-k, vocab)


def has_moe() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, "MixtralConfig") and hasattr(transformers.models.mixtral.modeling_mixtral,
                                                              "MixtralExperts")


def mixtral():
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                     num_experts_per_tok=K, max_position_embeddings=32, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def ids(seq=8, batch=1, seed=0):
    return torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(seed))
