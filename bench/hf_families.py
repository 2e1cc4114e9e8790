"""Hugging Face model families built from small configs (no download), for ``bench/sweep_hf.py``.

Every family is ``Family(kind, config, model, overrides, inputs, gen)``: the config class and the model class
by their ``transformers`` names, the small sizes (2 layers, hidden 64, 4 heads, intermediate 128, vocab 256,
32x32 images, 0.1 s of 16 kHz audio; each config's own field names), the example inputs the model is adapted
on and, for models that generate, the inputs ``generate`` starts from (the prompt). Inputs are seeded.

    >>> fam = FAMILIES["llama"]
    >>> model = fam.build()
    >>> sorted(fam.example())
    ['attention_mask', 'input_ids']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

VOCAB, SEQ, IMG, SAMPLES = 256, 8, 32, 1600
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LM = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64, **IDS)
ENC = dict(LM, type_vocab_size=2)
SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
               max_position_embeddings=64, decoder_start_token_id=0, forced_eos_token_id=None, **IDS)
T5 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
          decoder_start_token_id=0, **IDS)
VIT = dict(image_size=IMG, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_labels=10)
AUDIO = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
             num_conv_pos_embedding_groups=4, vocab_size=32, **IDS)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def tokens(seq: int = SEQ) -> dict:
    ids = torch.randint(3, VOCAB, (1, seq), generator=_gen())
    return {"input_ids": ids, "attention_mask": torch.ones(1, seq, dtype=torch.long)}


def seq2seq() -> dict:
    return {**tokens(), "decoder_input_ids": torch.randint(3, VOCAB, (1, 4), generator=_gen())}


def image(size: int = IMG) -> dict:
    return {"pixel_values": torch.randn(1, 3, size, size, generator=_gen())}


def waveform() -> dict:
    return {"input_values": torch.randn(1, SAMPLES, generator=_gen())}


def mel(bins: int = 16, frames: int = 32) -> dict:
    return {"input_features": torch.randn(1, bins, frames, generator=_gen())}


def prompt() -> dict:
    return tokens(4)


def encoder_prompt() -> dict:
    return tokens()


@dataclass(frozen=True)
class Family:
    kind: str                      # decoder, encoder, encoder-decoder, vision, audio, moe, state-space
    config: str                    # transformers config class name
    model: str                     # transformers model class name
    overrides: dict = field(default_factory=dict)
    inputs: Callable = tokens      # example inputs of transform
    gen: Callable | None = None    # generate's inputs (None: the model does not generate)

    def build(self):
        """The model from its small config, seeded, in eval mode."""
        import transformers as T

        torch.manual_seed(0)
        cfg = getattr(T, self.config)(**self.overrides)
        return getattr(T, self.model)(cfg).eval()

    def example(self):
        return self.inputs()


def _lm(config: str, model: str, kind: str = "decoder", **kw) -> Family:
    return Family(kind, config, model, {**LM, **kw}, tokens, prompt)


def _enc(config: str, model: str, **kw) -> Family:
    return Family("encoder", config, model, {**ENC, **kw}, tokens)


def _s2s(config: str, model: str, **kw) -> Family:
    return Family("encoder-decoder", config, model, {**SEQ2SEQ, **kw}, seq2seq, encoder_prompt)


_GPT2 = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, **IDS)

FAMILIES: dict[str, Family] = {
    # decoders (causal LMs; generate)
    "gpt2": Family("decoder", "GPT2Config", "GPT2LMHeadModel", _GPT2, tokens, prompt),
    "gpt_bigcode": Family("decoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", _GPT2, tokens, prompt),
    "gpt_neo": Family("decoder", "GPTNeoConfig", "GPTNeoForCausalLM",
                      dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           attention_types=[[["global", "local"], 1]], window_size=16,
                           max_position_embeddings=64, **IDS), tokens, prompt),
    "gptj": Family("decoder", "GPTJConfig", "GPTJForCausalLM",
                   dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, rotary_dim=8,
                        n_positions=64, **IDS), tokens, prompt),
    "gpt_neox": _lm("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "llama": _lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": _lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=16),
    "qwen2": _lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "qwen3": _lm("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16),
    "phi": _lm("PhiConfig", "PhiForCausalLM"),
    "phi3": _lm("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2),
    "gemma": _lm("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=16),
    "gemma2": _lm("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=16),
    "gemma3_text": _lm("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=16,
                       sliding_window=16),
    "opt": _lm("OPTConfig", "OPTForCausalLM", ffn_dim=128, word_embed_proj_dim=64),
    "bloom": Family("decoder", "BloomConfig", "BloomForCausalLM",
                    dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, **IDS), tokens, prompt),
    "falcon": _lm("FalconConfig", "FalconForCausalLM", num_kv_heads=2, new_decoder_architecture=True),
    "stablelm": _lm("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2),
    "starcoder2": _lm("Starcoder2Config", "Starcoder2ForCausalLM", num_key_value_heads=2, sliding_window=16),
    "olmo2": _lm("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2),
    "cohere": _lm("CohereConfig", "CohereForCausalLM", num_key_value_heads=2),
    "granite": _lm("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=2),
    "codegen": Family("decoder", "CodeGenConfig", "CodeGenForCausalLM",
                      dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, rotary_dim=8,
                           n_positions=64, n_ctx=64, **IDS), tokens, prompt),
    "biogpt": _lm("BioGptConfig", "BioGptForCausalLM"),
    "xglm": Family("decoder", "XGLMConfig", "XGLMForCausalLM",
                   dict(vocab_size=VOCAB, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                        max_position_embeddings=64, **IDS), tokens, prompt),
    # encoders
    "bert": _enc("BertConfig", "BertModel"),
    "roberta": _enc("RobertaConfig", "RobertaForMaskedLM", max_position_embeddings=72),
    "distilbert": Family("encoder", "DistilBertConfig", "DistilBertModel",
                         dict(vocab_size=VOCAB, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                              max_position_embeddings=64, pad_token_id=0)),
    "albert": _enc("AlbertConfig", "AlbertModel", embedding_size=32),
    "electra": _enc("ElectraConfig", "ElectraModel", embedding_size=64),
    "deberta_v2": _enc("DebertaV2Config", "DebertaV2Model"),
    "mpnet": _enc("MPNetConfig", "MPNetModel"),
    "modernbert": Family("encoder", "ModernBertConfig", "ModernBertModel",
                         dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=64, global_attn_every_n_layers=2,
                              local_attention=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              cls_token_id=1, sep_token_id=2)),
    # encoder-decoders (generate from the encoder's prompt)
    "t5": Family("encoder-decoder", "T5Config", "T5ForConditionalGeneration", T5, seq2seq, encoder_prompt),
    "bart": _s2s("BartConfig", "BartForConditionalGeneration"),
    "mbart": _s2s("MBartConfig", "MBartForConditionalGeneration"),
    "pegasus": _s2s("PegasusConfig", "PegasusForConditionalGeneration"),
    "marian": _s2s("MarianConfig", "MarianMTModel"),
    "m2m_100": _s2s("M2M100Config", "M2M100ForConditionalGeneration"),
    # vision
    "vit": Family("vision", "ViTConfig", "ViTForImageClassification", VIT, image),
    "deit": Family("vision", "DeiTConfig", "DeiTModel", VIT, image),
    "beit": Family("vision", "BeitConfig", "BeitModel", VIT, image),
    "dinov2": Family("vision", "Dinov2Config", "Dinov2Model", dict(VIT, mlp_ratio=2), image),
    "swin": Family("vision", "SwinConfig", "SwinModel",
                   dict(image_size=IMG, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                        window_size=4), image),
    "convnext": Family("vision", "ConvNextConfig", "ConvNextForImageClassification",
                       dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=10), image),
    "resnet": Family("vision", "ResNetConfig", "ResNetForImageClassification",
                     dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                          num_labels=10), image),
    "mobilenet_v2": Family("vision", "MobileNetV2Config", "MobileNetV2ForImageClassification",
                           dict(image_size=IMG, depth_multiplier=0.35, num_labels=10), image),
    "mobilevit": Family("vision", "MobileViTConfig", "MobileViTModel",
                        dict(image_size=64, hidden_sizes=[32, 48, 64],
                             neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160], num_attention_heads=4),
                             lambda: image(64)),
    "segformer": Family("vision", "SegformerConfig", "SegformerModel",
                        dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                             mlp_ratios=[2, 2]),
                        image),
    "regnet": Family("vision", "RegNetConfig", "RegNetModel",
                     dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                          groups_width=8),
                     image),
    # audio
    "wav2vec2": Family("audio", "Wav2Vec2Config", "Wav2Vec2Model", AUDIO, waveform),
    "hubert": Family("audio", "HubertConfig", "HubertModel", AUDIO, waveform),
    "wavlm": Family("audio", "WavLMConfig", "WavLMModel", dict(AUDIO, num_buckets=32, max_bucket_distance=64),
                    waveform),
    "whisper": Family("audio", "WhisperConfig", "WhisperForConditionalGeneration",
                      dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=16,
                           max_target_positions=32, decoder_start_token_id=1, suppress_tokens=None,
                           begin_suppress_tokens=None, **IDS),
                      lambda: {**mel(), "decoder_input_ids": torch.tensor([[1, 5, 6, 7]])}, mel),
    "speech_to_text": Family("audio", "Speech2TextConfig", "Speech2TextForConditionalGeneration",
                             dict(SEQ2SEQ, input_feat_per_channel=16, input_channels=1, num_conv_layers=2,
                                  conv_channels=32, max_source_positions=64, max_target_positions=32),
                             lambda: {"input_features": torch.randn(1, 32, 16, generator=_gen()),
                                      "decoder_input_ids": torch.tensor([[1, 5, 6, 7]])},
                             lambda: {"input_features": torch.randn(1, 32, 16, generator=_gen())}),
    "ast": Family("audio", "ASTConfig", "ASTModel",
                  dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8, time_stride=8),
                  lambda: {"input_values": torch.randn(1, 32, 16, generator=_gen())}),
    # mixture of experts
    "mixtral": _lm("MixtralConfig", "MixtralForCausalLM", "moe", num_key_value_heads=2, **MOE),
    "qwen2_moe": _lm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "moe", num_key_value_heads=2, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "qwen3_moe": _lm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "moe", num_key_value_heads=2, head_dim=16,
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "granitemoe": _lm("GraniteMoeConfig", "GraniteMoeForCausalLM", "moe", num_key_value_heads=2, **MOE),
    "switch_transformers": Family("moe", "SwitchTransformersConfig",
                                  "SwitchTransformersForConditionalGeneration",
                                  dict(T5, num_experts=4, expert_capacity=8, num_sparse_encoder_layers=1,
                                       num_sparse_decoder_layers=1), seq2seq, encoder_prompt),
    # state-space and recurrent
    "mamba": Family("state-space", "MambaConfig", "MambaForCausalLM",
                    dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                         conv_kernel=4, **IDS), tokens, prompt),
    "mamba2": Family("state-space", "Mamba2Config", "Mamba2ForCausalLM",
                     dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                          num_heads=8, head_dim=16, n_groups=1, chunk_size=8, conv_kernel=4, **IDS), tokens,
                          prompt),
    "falcon_mamba": Family("state-space", "FalconMambaConfig", "FalconMambaForCausalLM",
                           dict(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                                conv_kernel=4, **IDS), tokens, prompt),
    "rwkv": Family("state-space", "RwkvConfig", "RwkvForCausalLM",
                   dict(vocab_size=VOCAB, hidden_size=64, attention_hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, context_length=64, **IDS), tokens, prompt),
    "jamba": _lm("JambaConfig", "JambaForCausalLM", "state-space", num_key_value_heads=2, num_experts=2,
                 num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2,
                 attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                 use_mamba_kernels=False),
    # 2024-2026 families (issue 27): latent attention, MoE with shared experts and sinks, hybrid attention/SSM
    "deepseek_v3": _lm("DeepseekV3Config", "DeepseekV3ForCausalLM", "moe", num_hidden_layers=3,
                       num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
                       qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                       num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32,
                       first_k_dense_replace=1),
    "gpt_oss": _lm("GptOssConfig", "GptOssForCausalLM", "moe", num_key_value_heads=2, head_dim=16,
                   num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "bamba": _lm("BambaConfig", "BambaForCausalLM", "state-space", num_key_value_heads=2,
                 attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                 mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8),
    "qwen3_next": _lm("Qwen3NextConfig", "Qwen3NextForCausalLM", "state-space", num_key_value_heads=2,
                      head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                      linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      layer_types=["linear_attention", "full_attention"]),
    "olmo3": _lm("Olmo3Config", "Olmo3ForCausalLM", num_key_value_heads=2, sliding_window=16,
                 layer_types=["sliding_attention", "full_attention"]),
    "vaultgemma": _lm("VaultGemmaConfig", "VaultGemmaForCausalLM", num_key_value_heads=2, head_dim=16,
                      sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "granitemoehybrid": _lm("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", "state-space",
                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                            shared_intermediate_size=64, layer_types=["mamba", "attention"], mamba_n_heads=8,
                            mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8),
    "falcon_h1": _lm("FalconH1Config", "FalconH1ForCausalLM", "state-space", num_key_value_heads=2,
                     mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                     mamba_chunk_size=8),
    "nemotron_h": Family("state-space", "NemotronHConfig", "NemotronHForCausalLM",
                         dict(LM, num_hidden_layers=3, layers_block_type=["mamba", "attention", "mlp"],
                              num_key_value_heads=2, head_dim=16, ssm_state_size=8, mamba_num_heads=8,
                              mamba_head_dim=16, n_groups=1, expand=2, chunk_size=8),
                         tokens, prompt),
    "zamba2": Family("state-space", "Zamba2Config", "Zamba2ForCausalLM",
                     dict(LM, layers_block_type=["mamba", "hybrid"], mamba_d_state=8, n_mamba_heads=8,
                          mamba_ngroups=1, chunk_size=8, num_key_value_heads=4,
                          adapter_rank=8), tokens, prompt),
    "lfm2": _lm("Lfm2Config", "Lfm2ForCausalLM", num_key_value_heads=2,
                layer_types=["conv", "full_attention"], block_multiple_of=16),
    "flex_olmo": _lm("FlexOlmoConfig", "FlexOlmoForCausalLM", "moe", num_key_value_heads=2, num_experts=4,
                     num_experts_per_tok=2),
    "nemotron": _lm("NemotronConfig", "NemotronForCausalLM", num_key_value_heads=2, head_dim=16),
}
