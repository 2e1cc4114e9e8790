"""Data as users have it (``fxadapt.train.data``, ``fxadapt.train.probe``): ``(x, y)`` tensors, DataLoaders of
tensors, tuples or dicts, lists of Hugging Face batches, token batches, calibration data without labels — each
runs through the DNA and FUR searches; a loader is read no further than the batches used; bad data is a
one-line ``InputError`` naming it, raised before any work."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxadapt
from fxadapt.errors import CaptureError, FxAdaptError, InputError, InternalError
from fxadapt.train.data import Batches, Layout, prediction, task_loss
from fxadapt.train.probe import check_data

transformers = pytest.importorskip("transformers")

DNA = fxadapt.SearchConfig(steps=4, warmup=1, batch_size=8, progress=False)
FUR = fxadapt.FurConfig(iterations=1, train_steps=2, batch_size=8, val_samples=16, draws=1, progress=False)
G = torch.Generator().manual_seed(0)
X = torch.randn(32, 3, 8, 8, generator=G)
Y = torch.randint(0, 5, (32,), generator=G)
IDS = torch.randint(3, 96, (24, 8), generator=G)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def _cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=32,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def _run(model, example, data, strategy):
    opts = {"search": DNA} if strategy == "dna" else {"fur": FUR}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxadapt.transform(model, 0.5, example, data=data, strategy=strategy, **opts)
    rep = fxadapt.report(out)
    assert rep.macs_after <= 0.5 * rep.macs_before * 1.001
    return out


def _hf_batches(n=3, labels=True, mask=True):
    out = []
    for k in range(n):
        ids = IDS[8 * k:8 * (k + 1)]
        b = {"input_ids": ids}
        if mask:
            b["attention_mask"] = torch.ones_like(ids)
        if labels:
            b["labels"] = ids.clone()
        out.append(b)
    return out


class _DictSet(Dataset):
    """A map-style dataset of dicts, as ``datasets`` gives them after ``set_format('torch')``."""

    def __len__(self):
        return len(IDS)

    def __getitem__(self, i):
        return {"input_ids": IDS[i], "attention_mask": torch.ones_like(IDS[i]), "labels": IDS[i]}


CNN_FORMS = {
    "tensors": lambda: (X, Y),
    "loader_of_tuples": lambda: DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True),
    "inputs_only": lambda: X,
    "loader_of_inputs": lambda: DataLoader(X, batch_size=8),
}


@pytest.mark.parametrize("strategy", ["dna", "fur"])
@pytest.mark.parametrize("form", sorted(CNN_FORMS))
def test_cnn_data_forms_search(form, strategy):
    out = _run(_cnn(), X[:1], CNN_FORMS[form](), strategy)
    assert type(out) is TinyCNN and out(X[:2]).shape == (2, 5)


LM_FORMS = {
    "loader_of_dicts": lambda: DataLoader(_DictSet(), batch_size=8),
    "list_of_dicts": lambda: _hf_batches(),
    "list_without_labels": lambda: _hf_batches(labels=False),
    "token_tensor": lambda: IDS,
    "dict_of_tensors": lambda: {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS},
}


@pytest.mark.parametrize("strategy", ["dna", "fur"])
@pytest.mark.parametrize("form", sorted(LM_FORMS))
def test_gpt2_data_forms_search(form, strategy):
    example = {"input_ids": IDS[:1], "attention_mask": torch.ones_like(IDS[:1])}
    out = _run(_gpt2(), example, LM_FORMS[form](), strategy)    # the model's class, or the graph where the
    assert prediction(out(**example)).shape == (1, 8, 96)        # widths do not fit its heads (a warning)


def test_llama_loader_of_dicts_without_a_mask_in_the_batches():
    example = {"input_ids": IDS[:1], "attention_mask": torch.ones_like(IDS[:1])}
    batches = _hf_batches(mask=False)   # the mask is left out: ones
    out = _run(_llama(), example, DataLoader(batches, batch_size=None), "dna")
    assert isinstance(out, transformers.LlamaForCausalLM)


def test_layouts_tell_labels_next_tokens_and_calibration_apart():
    gpt = _gpt2()
    example = {"input_ids": IDS[:1]}
    lm = check_data(gpt, example, _hf_batches(mask=False))
    assert lm.layout.task == "causal"                        # GPT-2's own loss is the shifted one
    assert check_data(gpt, example, IDS).layout.task == "causal"   # tokens alone: next-token targets
    cnn = _cnn()
    assert check_data(cnn, X[:1], (X, Y)).layout.task == "labels"
    calib = check_data(cnn, X[:1], X)
    assert calib.layout.task == "none"
    b = Batches(calib, 8)
    assert not b.has_labels and b.get(0).targets is None and b.get(0).size == 8
    b.teacher = cnn
    ref = b.get(0).reference
    assert ref.shape == (8, 5)
    student = b.get(0)
    assert float(task_loss(ref, student)) == pytest.approx(0.0, abs=1e-6)   # the teacher itself: no distance
    # a token batch's loss is the model's own
    batch = Batches(lm, 8).get(0)
    own = gpt(**batch.inputs.kwargs, labels=batch.targets).loss
    torch.testing.assert_close(task_loss(batch.call(gpt).logits, batch), own)


def test_api_reads_one_part_and_keeps_the_tuple_form():
    b = Batches((X, Y), 8, 0)
    x, y = b.batch(2)
    assert torch.equal(b.inputs(2).args[0], x) and torch.equal(b.targets(2), y) and b.has_labels
    assert b.call(_cnn(), 2).shape == (8, 5)
    d = Batches(_hf_batches(), layout=Layout(task="labels"))
    assert sorted(d.batch(0)) == ["attention_mask", "input_ids", "labels"]


class CountingSet(Dataset):
    def __init__(self, n):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 8, 8, generator=g), int(torch.randint(0, 5, (), generator=g))


def test_many_budgets_read_a_loader_no_further_than_used():
    """Each budget's gate search starts at a far batch index (1e6 * (i + 1)): the loader is not iterated up to
    it; every sample read is one a step used."""
    ds = CountingSet(64)
    loader = DataLoader(ds, batch_size=8, shuffle=True)
    cfg = fxadapt.SearchConfig(steps=8, warmup=2, batch_size=8, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = fxadapt.transform(_cnn(), [0.25, 0.5, 0.75], X[:1], data=loader, strategy="dna", search=cfg,
                                 recalibrate_bn=0)
    assert len(outs) == 3
    gate_steps = max(cfg.steps // 8, 1)
    # weight, gate, per budget, the check
    used = cfg.steps + (cfg.steps - cfg.warmup) + 3 * gate_steps + 1
    assert ds.reads <= used * 8


def test_a_far_loader_step_reads_one_batch():
    ds = CountingSet(64)
    b = Batches(DataLoader(ds, batch_size=8), 8)
    b.batch(1_000_000)
    assert ds.reads == 8
    it = Batches(DataLoader(TensorDataset(X, Y), batch_size=8), 8)    # an iterable walk: modulo its epoch
    assert torch.equal(it.batch(4_000_001)[0], X[8:16])


def _bad(model, example, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxadapt.transform(model, 0.5, example, data=data, strategy="dna", search=DNA, **kw)


BAD = {
    "different_lengths": (lambda: (X, Y[:20]), InputError, "different lengths"),
    "labels_outside_classes": (lambda: (X, Y + 5), InputError, "labels lie in"),
    "too_little": (lambda: (X[:1], Y[:1]), InputError, "at least 2"),
    "wrong_input_size": (lambda: (torch.randn(8, 3, 9, 9), Y[:8]), InputError, "shape"),
    "batch_model_cannot_take": (lambda: (X.double(), Y), InputError, "cannot take its first batch"),
    "loss_mismatch": (lambda: (X, torch.randn(32, 7)), InputError, "loss does not fit"),
    "not_data": (lambda: "train.csv", InputError, "data must be"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_data_is_one_line_naming_the_data(kind):
    make, err, words = BAD[kind]
    with pytest.raises(err) as info:
        _bad(_cnn(), X[:1], make())
    msg = str(info.value)
    assert words in msg and "\n" not in msg and not isinstance(info.value, InternalError)
    assert msg.startswith("data") or "data" in msg.split(":")[0]


def test_bad_lm_batches_name_the_data():
    gpt = _gpt2()
    example = {"input_ids": IDS[:1, :8]}
    with pytest.raises(InputError, match="'input_ids' has shape") as info:
        _bad(gpt, example, {"input_ids": torch.randint(3, 96, (8, 12))})
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="keys .*token_type_ids"):
        _bad(gpt, example, [{"input_ids": IDS[:8], "token_type_ids": IDS[:8] * 0}])
    with pytest.raises(InputError, match="labels lie in"):
        _bad(gpt, example, [{"input_ids": IDS[:8], "labels": IDS[:8] + 200}])


def test_a_model_on_the_meta_device_is_refused_before_capture():
    with torch.device("meta"):
        model = TinyCNN()
    with pytest.raises(InputError, match="meta device") as info:
        _bad(model, X[:1], (X, Y))
    assert "\n" not in str(info.value) and not isinstance(info.value, InternalError)
    with pytest.raises(InputError, match="meta device"):
        fxadapt.transform(model, 0.5, X[:1])


def test_a_data_dependent_branch_is_one_line_with_the_users_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else 2 * self.lin(x)

    with pytest.raises(CaptureError) as info:
        fxadapt.transform(Branchy(), 0.5, (torch.randn(2, 4),))
    msg = str(info.value)
    assert "\n" not in msg and "if x.sum() > 0 else" in msg and __file__ in msg
    assert isinstance(info.value, FxAdaptError) and not isinstance(info.value, InternalError)


def test_finetune_reads_hugging_face_batches_with_the_models_own_loss():
    gpt = _gpt2()
    batches = _hf_batches(mask=False)
    with torch.no_grad():
        before = float(gpt(**batches[0]).loss)
    tuned = fxadapt.finetune(gpt, batches * 4, epochs=1,
                             cfg=fxadapt.FinetuneConfig(batch_size=8, lr=0.05, kd=0.0))
    with torch.no_grad():
        assert float(tuned(**batches[0]).loss) < before      # the next-token loss it trained on went down
