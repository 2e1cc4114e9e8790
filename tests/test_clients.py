"""The clients people use after pruning, on the adapted model (issue 28): PEFT LoRA train + merge, ``Trainer``
with a checkpoint reloaded, ``torch.compile``, ``resize_token_embeddings`` then save / reload, a
``pipeline`` with a tokenizer trained here, and stock loaders (``from_pretrained`` / ``from_config``).

Models: a GQA Llama, GPT-2, BERT (masked LM) and a GQA Qwen2, tiny configs; per-layer
(``layers="any"``) and uniform widths at 0.5 and 1.5. Every client runs on the original first: a check
the original fails does not count (skipped). The default run covers each model and each mode once
(``torch.compile`` through dynamo with the ``aot_eager`` backend on one case: 5-15 s a compile); the
whole matrix and inductor's compile are ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import warnings

import pytest
import torch

import fxadapt

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V, SEQ = 500, 12
MODELS = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)), T.AutoModelForCausalLM),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_head=4, n_layer=2,
                                                    n_positions=64)),
             T.AutoModelForCausalLM),
    "bert": (lambda: T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=128, num_attention_heads=8,
                                                    intermediate_size=256, num_hidden_layers=2,
                                                    max_position_embeddings=64)), T.AutoModelForMaskedLM),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)), T.AutoModelForCausalLM),
}
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "qwen2": ["q_proj", "v_proj"]}
DEFAULT = {("llama", "any", 0.5), ("llama", "uniform", 1.5), ("gpt2", "uniform", 0.5), ("bert", "any", 1.5),
           ("bert", "uniform", 0.5), ("qwen2", "uniform", 0.5)}
CASES = [pytest.param(c, id="-".join(map(str, c)), marks=() if c in DEFAULT else pytest.mark.slow)
         for c in [(m, layers, b) for m in MODELS for layers in ("any", "uniform") for b in (0.5, 1.5)]]


def _ids(n: int = 2, seq: int = SEQ, high: int = V) -> dict:
    g = torch.Generator().manual_seed(n * 100 + seq)
    ids = torch.randint(5, high, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@functools.cache
def _original(name: str):
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


@functools.cache
def _adapted(case: tuple):
    name, layers, budget = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxadapt.WriteBackWarning)   # a graph fallback is a failure here
        out = fxadapt.transform(_original(name), budget, _ids(), layers=layers)
    assert type(out) is type(_original(name))
    return out


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _run(client, case, tmp_path):
    """``client`` on the original (a failure there skips: the check does not count), then on the result."""
    try:
        client(copy.deepcopy(_original(case[0])), case, tmp_path / "original")
    except Exception as e:  # noqa: BLE001 - whatever the original fails, the check does not count
        pytest.skip(f"the original fails this check too: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    client(copy.deepcopy(_adapted(case)), case, tmp_path / "adapted")


# -- clients ---------------------------------------------------------------------------------------------

def lora_train_merge(model, case, where):
    import peft

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[case[0]])
    pm = peft.get_peft_model(model.train(), cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = _ids()
    for _ in range(3):
        loss = pm(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    pm.eval()
    before = _logits(pm, batch)
    merged = pm.merge_and_unload()
    assert type(merged) is type(model)
    torch.testing.assert_close(_logits(merged, batch), before, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(where)
    torch.testing.assert_close(_logits(fxadapt.from_pretrained(where), batch), before, rtol=1e-4, atol=1e-4)


def trainer_checkpoint(model, case, where):
    ds = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in _ids(8)["input_ids"]]
    args = T.TrainingArguments(output_dir=str(where), max_steps=2, save_steps=2,
                               per_device_train_batch_size=4, report_to="none", use_cpu=True,
                               logging_strategy="no", disable_tqdm=True)
    trainer = T.Trainer(model=model, args=args, train_dataset=ds)
    trainer.train()
    ckpt = where / "checkpoint-2"
    again = fxadapt.from_pretrained(ckpt)
    batch = _ids()
    torch.testing.assert_close(_logits(again, batch), _logits(model.eval(), batch), rtol=1e-5, atol=1e-5)
    resumed = T.Trainer(model=again.train(), args=T.TrainingArguments(**{**args.to_dict(), "max_steps": 3}),
                        train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(ckpt))   # optimizer / scheduler state of the adapted shapes
    assert resumed.state.global_step == 3


def compile_eager(model, case, where, backend="aot_eager"):
    batch = _ids(3, SEQ + 3)
    compiled = torch.compile(model.eval(), backend=backend)
    torch.testing.assert_close(_logits(compiled, batch), _logits(model, batch), rtol=1e-4, atol=1e-4)


def resize_save_reload(model, case, where):
    model.resize_token_embeddings(V + 100)
    model.save_pretrained(where)
    batch = _ids(high=V + 100)
    want = _logits(model.eval(), batch)
    assert want.shape[-1] == V + 100
    torch.testing.assert_close(_logits(fxadapt.from_pretrained(where), batch), want, rtol=1e-5, atol=1e-5)
    if "fxadapt_recipe" not in json.loads((where / "config.json").read_text()):   # stock when uniform
        torch.testing.assert_close(_logits(MODELS[case[0]][1].from_pretrained(where), batch), want,
                                   rtol=1e-5, atol=1e-5)


@functools.cache
def _tokenizer():
    """A byte-level BPE trained here on the standard library's ``json`` sources (no download)."""
    import json as src

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["[UNK]", "[PAD]", "[MASK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator([inspect.getsource(src)],
                            trainers.BpeTrainer(vocab_size=V - 20, special_tokens=special))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                     mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]",
                                     eos_token="[SEP]")


def pipeline_with_trained_tokenizer(model, case, where):
    tok = _tokenizer()
    assert len(tok) <= V
    if case[0] == "bert":
        fill = T.pipeline("fill-mask", model=model.eval(), tokenizer=tok, device="cpu")
        out = fill("def loads(s, [MASK]):", top_k=3)
        assert len(out) == 3 and all(0 <= o["score"] <= 1 for o in out)
        return
    gen = T.pipeline("text-generation", model=model.eval(), tokenizer=tok, device="cpu")
    out = gen("def dumps(obj", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("def dumps(obj")


def stock_loaders(model, case, where):
    """Stock loaders read the saved config right or refuse it: never a model of other shapes."""
    model.save_pretrained(where)
    saved = json.loads((where / "config.json").read_text())
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        config = T.AutoConfig.from_pretrained(where)
        with torch.device("meta"):
            built = MODELS[case[0]][1].from_config(config)
    except Exception:  # noqa: BLE001 - a refusal is loud: fine unless the config claims to be stock
        assert "fxadapt_recipe" in saved, "a config without a recipe that stock loaders refuse"
        return
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} \
            == mine, "from_config builds other shapes"
    assert "fxadapt_recipe" not in saved or case[1] == "any"
    if case[1] == "uniform":
        batch = _ids()
        torch.testing.assert_close(_logits(MODELS[case[0]][1].from_pretrained(where), batch),
                                   _logits(model.eval(), batch), rtol=1e-5, atol=1e-5)


# -- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_peft_lora_trains_and_merges(case, tmp_path):
    _run(lora_train_merge, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_trainer_checkpoint_reloads_and_resumes(case, tmp_path):
    _run(trainer_checkpoint, case, tmp_path)


@pytest.mark.parametrize("case", [pytest.param(*c.values, id=c.id,
                                               marks=() if c.values[0] == ("llama", "uniform", 1.5)
                                                else pytest.mark.slow) for c in CASES])
def test_torch_compile_traces_the_adapted_model(case, tmp_path):
    _run(compile_eager, case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.values[0][0] == "llama"])
def test_torch_compile_inductor(case, tmp_path):
    def inductor(model, case, where):
        try:
            compile_eager(model, case, where, backend="inductor")
        except Exception as e:  # noqa: BLE001 - no C++ compiler here: the client cannot run at all
            if "compiler" in str(e).lower() or "InvalidCxxCompiler" in type(e).__name__:
                pytest.skip(f"inductor has no working C++ toolchain here: {str(e).splitlines()[0][:120]}")
            raise

    _run(inductor, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_resize_token_embeddings_then_save_and_reload(case, tmp_path):
    _run(resize_save_reload, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_pipeline_with_a_tokenizer_trained_here(case, tmp_path):
    _run(pipeline_with_trained_tokenizer, case, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_stock_loaders_read_the_config_right_or_refuse_it(case, tmp_path):
    _run(stock_loaders, case, tmp_path)
