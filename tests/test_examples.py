"""Smoke tests of the examples' pieces on the CPU: the naive Based LM, the MQAR data, quickstart."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from based_compile.kernels.naive import naive_parallel_based
from compare import assert_rel_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from mqar_data import IGNORE, mqar_batch, recall_accuracy  # noqa: E402
from naive_based_lm import ATTENTION_FORMS, BasedLM, BasedMixer, sdpa_softmax_attention  # noqa: E402
from train_mqar import learning_rate  # noqa: E402
from train_mqar import main as train_main  # noqa: E402


def _lm(form, n_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    return BasedLM(50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_len=64,
                   attention_form=form).double()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_lm_forms_agree_float64(n_kv_heads):
    ids = torch.randint(0, 50, (2, 37))
    outs, grads = {}, {}
    for form in ATTENTION_FORMS:
        model = _lm(form, n_kv_heads)                          # same seed: the same weights
        logits = model(ids)
        weights = torch.randn_like(logits, generator=torch.Generator().manual_seed(1))
        (logits * weights).sum().backward()
        outs[form] = logits.detach()
        grads[form] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for form in ATTENTION_FORMS[1:]:
        assert_rel_close(outs[form], outs["feature_map"], 1e-12, f"{form} logits")
        assert_rel_close(grads[form], grads["feature_map"], 1e-10, f"{form} parameter grads")


@pytest.mark.parametrize("form", ATTENTION_FORMS)
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_mixer_attention_is_based_attention(form, n_kv_heads):
    # Each form, called inside the mixer, equals the package's float64 reference with scale d^-1/2,
    # coefficients (1, 1, 1/2): swap the reference in through the attention_impl hook and compare.
    torch.manual_seed(3)
    mixer = BasedMixer(32, 4, feature_dim=8, n_kv_heads=n_kv_heads, attention_form=form, eps=1e-6).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    naive_out = mixer(x)
    calls = []

    def reference(q, k, v):                                    # [B, H, T, d], [B, H, T, d], [B, H, T, Dv]
        calls.append(q.shape)
        return naive_parallel_based(q, k, v, scale=8 ** -0.5, eps=1e-6)

    mixer.attention_impl = reference
    assert_rel_close(naive_out, mixer(x), 1e-12, f"{form} mixer vs naive_parallel_based")
    assert calls == [torch.Size([2, 4, 29, 8])]


def test_sdpa_impl_is_softmax_attention():
    q, k = torch.randn(2, 3, 11, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    assert_rel_close(sdpa_softmax_attention(q, k, v), s.softmax(-1) @ v, 1e-12, "sdpa impl")


def test_lm_set_attention_impl_and_errors():
    model = _lm("polynomial")
    with torch.no_grad():                                      # scores far from 0: softmax != Based
        for block in model.blocks:
            block.attn.q_proj.weight.mul_(100)
            block.attn.k_proj.weight.mul_(100)
    ids = torch.randint(0, 50, (1, 9))
    before = model(ids)
    model.set_attention_impl("sdpa")
    assert (model(ids) - before).abs().max() > 1e-3            # softmax attention is another function
    model.set_attention_impl(None)
    assert torch.equal(model(ids), before)
    with pytest.raises(ValueError, match="attention_impl"):
        model.set_attention_impl("flash")
    with pytest.raises(ValueError, match="attention_form"):
        BasedLM(10, attention_form="softmax")
    with pytest.raises(ValueError, match="max_len"):
        BasedLM(10, d_model=16, n_layers=1, n_heads=2, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
    assert model.lm_head.weight is model.embed.weight          # tied head


@pytest.mark.parametrize("seq_len,pairs", [(32, 4), (33, 4), (64, 31)])
def test_mqar_batch_is_valid(seq_len, pairs):
    vocab = 80
    ids, targets = mqar_batch(16, seq_len, vocab, pairs, torch.Generator().manual_seed(seq_len))
    assert ids.shape == targets.shape == (16, seq_len)
    num_keys = (vocab - 1) // 2
    queries = (seq_len + 1 - 2 * pairs) // 2
    for row_ids, row_targets in zip(ids.tolist(), targets.tolist()):
        keys, values = row_ids[0:2 * pairs:2], row_ids[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= key <= num_keys for key in keys)
        assert all(num_keys < value < vocab for value in values)
        value_of = dict(zip(keys, values))
        answers = [(p, t) for p, t in enumerate(row_targets) if t != IGNORE]
        assert len(answers) == queries
        for pos, answer in answers:
            assert pos >= 2 * pairs and row_ids[pos] in value_of
            assert answer == value_of[row_ids[pos]]            # the value of the earlier key
            if pos + 1 < seq_len:
                assert row_ids[pos + 1] == answer              # the answer follows its query in the stream
        assert all(t == IGNORE for t in row_targets[:2 * pairs])


def test_mqar_batch_errors_and_accuracy():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        mqar_batch(2, 64, 20, 10)
    with pytest.raises(ValueError, match="seq_len"):
        mqar_batch(2, 8, 80, 4)
    ids, targets = mqar_batch(4, 32, 80, 4, torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(targets.clamp(min=0), 80).double()
    assert recall_accuracy(perfect, targets) == 1.0
    wrong = torch.nn.functional.one_hot((targets.clamp(min=0) + 1) % 80, 80).double()
    assert recall_accuracy(wrong, targets) == 0.0


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert learning_rate(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)


def test_train_mqar_eager_runs():
    runs = train_main(["--eager", "--device", "cpu", "--steps", "4", "--batch", "4", "--seq-len", "24",
                       "--num-kv-pairs", "4", "--d-model", "16", "--layers", "1", "--heads", "2"])
    assert len(runs) == 1 and len(runs[0]["losses"]) == 4
    assert all(math.isfinite(loss) for loss in runs[0]["losses"])
    assert 0.0 <= runs[0]["eval_acc"] <= 1.0


def test_quickstart_runs():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--device", "cpu", "--batch", "1", "--seq-len", "48",
         "--d-model", "32", "--heads", "2", "--reps", "1"],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 Based attention site(s)" in proc.stdout
    assert "MISMATCH" not in proc.stdout
    for name in ("eager", "inductor", "based"):
        assert f"{name:>8} vs float32 eager" in proc.stdout
        assert any(line.strip().startswith(name) and "ms" in line for line in proc.stdout.splitlines())


def _fake_fla(monkeypatch, head_first: bool):
    """A stand-in fla.ops.based whose kernels compute Based attention with fla's argument conventions."""
    import types

    def kernel(q, k, v, scale=None, use_norm=True, **kw):
        bthd = not kw.get("head_first", False)                 # the time-first layout unless head_first
        if bthd:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = naive_parallel_based(q, k, v, scale=scale, normalize=use_norm, eps=1e-6)
        return o.transpose(1, 2) if bthd else o

    def with_head_first(q, k, v, scale=None, use_norm=True, head_first=True):
        return kernel(q, k, v, scale, use_norm, head_first=head_first)

    def time_first(q, k, v, scale=None, use_norm=True):
        return kernel(q, k, v, scale, use_norm)

    fn = with_head_first if head_first else time_first
    based = types.ModuleType("fla.ops.based")
    based.parallel_based = based.fused_chunk_based = fn
    ops = types.ModuleType("fla.ops")
    ops.based = based
    fla = types.ModuleType("fla")
    fla.ops = ops
    for name, module in (("fla", fla), ("fla.ops", ops), ("fla.ops.based", based)):
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("head_first", [True, False])
@pytest.mark.parametrize("kind", ["parallel", "fused_chunk"])
def test_fla_adapter_layouts(monkeypatch, head_first, kind):
    from naive_based_lm import fla_based_attention

    _fake_fla(monkeypatch, head_first)
    q, k = torch.randn(2, 3, 13, 8, dtype=torch.float64), torch.randn(2, 3, 13, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 13, 5, dtype=torch.float64)
    ref = naive_parallel_based(q, k, v, scale=8 ** -0.5, eps=1e-6)
    assert_rel_close(fla_based_attention(kind)(q, k, v), ref, 1e-12, "fla adapter, auto layout")
    wrong = "BTHD" if head_first else "BHTD"                    # the other layout must not match
    if head_first:
        assert_rel_close(fla_based_attention(kind, "BTHD")(q, k, v), ref, 1e-12, "head_first=False path")
    else:
        assert (fla_based_attention(kind, wrong)(q, k, v) - ref).abs().max() > 1e-3


def test_e2e_benchmark_smoke(tmp_path, monkeypatch):
    # The benchmark on the CPU with a tiny model: eager and fla (a stand-in module) train and prefill,
    # and a missing fla is reported as unavailable, not a crash; the JSON merges across runs.
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    import e2e

    common = ["--device", "cpu", "--out", str(tmp_path), "--layers", "1", "--d-model", "32", "--heads", "2",
              "--vocab-size", "64", "--lengths", "32", "--tokens", "64", "--reps", "1", "--warmup", "1",
              "--precision", "fp32"]
    data = e2e.main(common + ["--variants", "eager,fla"])
    status = {(r["mode"], r["variant"]): r["status"] for r in data["results"]}
    assert status[("train", "eager")] == status[("prefill", "eager")] == "ok"
    assert status[("train", "fla")] == "unavailable" or "fla" in sys.modules
    _fake_fla(monkeypatch, head_first=False)
    data = e2e.main(common + ["--variants", "fla"])
    results = {(r["mode"], r["variant"]): r for r in data["results"]}
    assert len(results) == 4 and len(data["runs"]) == 2
    assert results[("train", "fla")]["status"] == "ok"
    assert results[("train", "fla")]["first_losses"][0] == pytest.approx(
        results[("train", "eager")]["first_losses"][0], rel=1e-5)
    assert (tmp_path / "e2e.json").exists()


def test_e2e_halves_batch_on_out_of_memory(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    import e2e

    real = e2e.measure_prefill

    def fake_prefill(args, model, run, batch, t, device):
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(args, model, run, batch, t, device)

    monkeypatch.setattr(e2e, "measure_prefill", fake_prefill)
    data = e2e.main(["--device", "cpu", "--out", str(tmp_path), "--layers", "1", "--d-model", "16", "--heads", "2",
                     "--vocab-size", "32", "--lengths", "16", "--tokens", "64", "--reps", "1", "--warmup", "1",
                     "--precision", "fp32", "--modes", "prefill", "--variants", "eager"])
    entry, = data["results"]
    assert entry["status"] == "ok" and entry["batch"] == 1 and entry["oom_at_batch"] == [4, 2]


def test_long_context_eager_and_sdpa_run(tmp_path):
    import json

    from long_context import main as long_context_main

    out = tmp_path / "long.json"
    results = long_context_main(["--device", "cpu", "--lengths", "16,32", "--d-model", "32", "--layers", "1",
                                 "--heads", "2", "--vocab-size", "64", "--reps", "1", "--variants", "eager,sdpa",
                                 "--json", str(out)])
    assert [(r["seq_len"], r["variant"], r["status"]) for r in results] == [
        (16, "eager", "ok"), (16, "sdpa", "ok"), (32, "eager", "ok"), (32, "sdpa", "ok")]
    assert len(json.loads(out.read_text())["results"]) == 4


def test_inductor_cantsplit_workaround(monkeypatch):
    """The benchmark-only workaround: a class shaped like torch 2.11's CantSplit (two required
    arguments) can then be raised bare and caught; a class that needs no fix is left alone."""
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "benchmarks"))
    import inductor_cantsplit

    class CantSplit(Exception):
        def __init__(self, expr, remaining):
            super().__init__()
            self.expr, self.remaining = expr, remaining

    assert inductor_cantsplit.needed(CantSplit)
    assert "178676" in inductor_cantsplit.patch(CantSplit)
    with pytest.raises(CantSplit) as caught:
        raise CantSplit
    assert caught.value.expr is None and not inductor_cantsplit.needed(CantSplit)
    assert CantSplit(2, 3).remaining == 3
    assert inductor_cantsplit.patch(CantSplit) is None
    assert isinstance(inductor_cantsplit.needed(), bool)      # this torch's own class, left as it is


def test_e2e_attention_kernel_names(monkeypatch):
    """The kernels counted as attention by ``--attention-share``: ours and fla-core's, not Inductor's."""
    monkeypatch.syspath_prepend(str(EXAMPLES.parent / "benchmarks"))
    import e2e
    from based_compile.kernels import fused_chunk, parallel

    ours = [name for module in (parallel, fused_chunk) for name in dir(module) if name.endswith("_kernel")]
    assert len(ours) >= 6 and all(e2e.is_attention_kernel(name) for name in ours), ours
    assert e2e.is_attention_kernel("parallel_based_fwd_kernel")
    for name in ("triton_per_fused_add_mul_0", "triton_red_fused__to_copy_sum_3", "ampere_bf16_s16816gemm",
                 "void at::native::vectorized_elementwise_kernel<4>"):
        assert not e2e.is_attention_kernel(name)
