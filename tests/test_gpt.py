"""The GPT net, CausalLM training plumbing and the throughput callback (CPU, each test a few seconds)."""

import itertools
import math
import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightscale.data.text import TextDataModule
from lightscale.models.causal_lm import CausalLM, param_groups
from lightscale.nets.gpt import GPT, GPTConfig
from lightscale.schedules import WarmupCosine, warmup_cosine
from lightscale.tracking.throughput import ThroughputLogger, compute_dtype, device_peak_flops

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
POEM = (
    "Tyger Tyger, burning bright,\nIn the forests of the night;\nWhat immortal hand or eye,\n"
    "Could frame thy fearful symmetry?\nIn what distant deeps or skies.\nBurnt the fire of thine eyes?\n"
)


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY.__dict__, **overrides}))


def tokens(batch: int = 3, time: int = 16, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


def cpu_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- the net


def test_shapes_and_loss_at_init_is_log_vocab() -> None:
    net = tiny_gpt()
    x, y = tokens(), tokens(seed=2)
    logits = net(x)
    assert logits.shape == (3, 16, 97)
    logits2, loss = net(x, y)
    assert torch.equal(logits, logits2) and loss.shape == ()
    assert abs(loss.item() - math.log(97)) < 0.1  # near-uniform predictions from the small init


def test_changing_a_future_token_never_changes_earlier_logits() -> None:
    net = tiny_gpt().eval()
    x = tokens(batch=1, time=20)
    for t in (0, 7, 19):
        changed = x.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        a, b = net(x), net(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t], b[:, t])  # the changed position itself does see it


def test_longer_than_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size 32"):
        tiny_gpt()(tokens(time=33))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_head_is_tied_and_counted_once() -> None:
    net = tiny_gpt()
    assert net.lm_head.weight is net.wte.weight
    unique = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    assert net.num_params(non_embedding=False) == unique
    assert net.num_params() == unique - 32 * 32  # minus the position table
    c = net.config
    assert net.flops_per_token() == 6 * net.num_params() + 12 * c.n_layer * c.n_embd * c.block_size
    assert net.flops_per_token(8) == 6 * net.num_params() + 12 * c.n_layer * c.n_embd * 8


def test_init_scales_residual_projections_by_depth() -> None:
    net = tiny_gpt(n_layer=8, n_embd=128)
    expected = 0.02 / math.sqrt(2 * 8)
    for block in net.blocks:
        for weight in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.q.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    x, y = tokens(), tokens(seed=2)
    grads = []
    for checkpointing in (False, True):
        net = tiny_gpt()
        net.activation_checkpointing = checkpointing
        net(x, y)[1].backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_generate_length_cropping_and_determinism() -> None:
    net = tiny_gpt(block_size=8).eval()
    prompt = tokens(batch=2, time=3)
    out = net.generate(prompt, max_new_tokens=20)  # longer than block_size: the context is cropped
    assert out.shape == (2, 23) and torch.equal(out[:, :3], prompt)
    runs = [
        net.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    torch.manual_seed(3)
    a = net.generate(prompt, 10)
    torch.manual_seed(3)
    assert torch.equal(a, net.generate(prompt, 10))  # global seed also fixes it
    greedy = net.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, net.generate(prompt, 5, temperature=0))
    last = net(greedy[:, -9:-1])[:, -1].argmax(-1)
    assert torch.equal(greedy[:, -1], last)


def test_top_k_one_is_greedy() -> None:
    net = tiny_gpt().eval()
    prompt = tokens(batch=1, time=4)
    assert torch.equal(net.generate(prompt, 6, top_k=1), net.generate(prompt, 6, temperature=0))


# ---------------------------------------------------------------------------------------- optimisation


def test_weight_decay_only_on_linear_weights() -> None:
    net = tiny_gpt(bias=True)
    decay, no_decay = param_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}  # the tied head appears as wte.weight
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    linear = {f"{n}.weight" for n, m in net.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert decayed == linear
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "blocks.0.attn.q.bias"} <= kept
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)  # every parameter exactly once


def test_lr_schedule_warmup_cosine_floor() -> None:
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110

    def at(step: int) -> float:
        return lr * warmup_cosine(step, warmup, total, floor=min_lr / lr)

    assert at(0) == pytest.approx(lr / 11)  # nanoGPT: lr * (it + 1) / (warmup + 1)
    assert at(4) == pytest.approx(lr * 5 / 11)
    assert at(10) == pytest.approx(lr)  # peak right after warm-up
    assert at(60) == pytest.approx(min_lr + 0.5 * (lr - min_lr))  # half way down the cosine
    assert at(110) == pytest.approx(min_lr) and at(500) == pytest.approx(min_lr)  # floor, then flat
    values = [at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_optimizer_and_scheduler_step_per_optimizer_step(tmp_path: Path) -> None:
    model = CausalLM(
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        lr=1e-3,
        optimizer=partial(torch.optim.AdamW, betas=(0.9, 0.95)),
        scheduler=partial(WarmupCosine, warmup_steps=2, min_lr_ratio=0.1),
        sample_prompt=None,
    )
    trainer = cpu_trainer(tmp_path, max_steps=6, limit_val_batches=0)
    dm = TextDataModule(path=str(corpus(tmp_path)), block_size=16, batch_size=2, cache_dir=str(tmp_path / "c"))
    trainer.fit(model, dm)
    optimizer = trainer.optimizers[0]
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(6, 2, 6, floor=0.1))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # max_steps taken from the Trainer


# ---------------------------------------------------------------------------------------- training


def corpus(tmp_path: Path, repeats: int = 30) -> Path:
    path = tmp_path / "poem.txt"
    path.write_text(POEM * repeats)
    return path


def test_tiny_model_overfits_a_tiny_corpus(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = TextDataModule(
        path=str(corpus(tmp_path)),
        tokenizer="char",
        block_size=32,
        batch_size=16,
        train_samples_per_epoch=16 * 250,
        val_batches=2,
        cache_dir=str(tmp_path / "cache"),
    )
    model = CausalLM(
        block_size=32,
        n_layer=2,
        n_head=4,
        n_embd=64,
        lr=3e-3,
        scheduler=partial(WarmupCosine, warmup_steps=20, min_lr_ratio=0.1),
        sample_prompt=None,
        vocab_size=dm.vocab_size,
    )
    trainer = cpu_trainer(tmp_path, max_steps=250, val_check_interval=250)
    initial = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    assert initial == pytest.approx(math.log(dm.vocab_size), abs=0.1)
    trainer.fit(model, dm)
    final = trainer.callback_metrics["val/loss"].item()
    assert final < 0.3, final  # the poem is memorised (uniform guessing: ~3.4 nats)


def test_predict_continues_each_prompt_as_text(tmp_path: Path) -> None:
    dm = TextDataModule(
        path=str(corpus(tmp_path)),
        tokenizer="char",
        block_size=16,
        batch_size=4,
        prompts=["Tyger", "In what"],
        cache_dir=str(tmp_path / "cache"),
    )
    model = CausalLM(
        vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, max_new_tokens=7, temperature=0
    )
    outputs = cpu_trainer(tmp_path).predict(model, dm)
    texts = [text for batch in outputs for text in batch]
    assert [t[:-7] for t in texts] == ["Tyger", "In what"] and all(
        len(t) == len(p) + 7 for t, p in zip(texts, ["Tyger", "In what"], strict=True)
    )
    again = [t for b in cpu_trainer(tmp_path).predict(model, dm) for t in b]
    assert texts == again  # greedy decoding is deterministic


def test_validation_sample_leaves_the_global_rng_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = TextDataModule(
        path=str(corpus(tmp_path)),
        tokenizer="char",
        block_size=16,
        batch_size=4,
        val_batches=1,
        cache_dir=str(tmp_path / "cache"),
    )
    model = CausalLM(
        vocab_size=dm.vocab_size,
        block_size=16,
        n_layer=1,
        n_head=2,
        n_embd=16,
        sample_prompt="Tyger",
        max_new_tokens=12,
    )
    trainer = cpu_trainer(tmp_path, max_steps=2, val_check_interval=2)
    trainer.fit(model, dm)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    with caplog.at_level("INFO"):
        model.on_validation_epoch_end()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert "Sample at step 2:\nTyger" in caplog.text


def test_compile_switch_trains_like_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path(os.environ.get("LIGHTSCALE_INDUCTOR_CACHE", "~/.cache/lightscale/inductor")).expanduser()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    dm_args = {"path": str(corpus(tmp_path)), "block_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "c")}
    weights = []
    for compile_ in (False, True):
        L.seed_everything(0)
        model = CausalLM(block_size=16, n_layer=2, n_head=2, n_embd=32, compile=compile_, sample_prompt=None)
        cpu_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, TextDataModule(**dm_args))
        if compile_:
            assert all(block._compiled_call_impl is not None for block in model.net.blocks)
            assert list(model.state_dict()) == list(weights[0])  # checkpoint keys unchanged by compiling
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- throughput


def test_throughput_logger_counts_tokens_and_reports_no_mfu_on_cpu(tmp_path: Path) -> None:
    assert device_peak_flops(torch.device("cpu"), torch.float32) is None
    assert compute_dtype("bf16-mixed") == torch.bfloat16 and compute_dtype("32-true") == torch.float32
    dm = TextDataModule(path=str(corpus(tmp_path)), block_size=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    model = CausalLM(block_size=16, n_layer=1, n_head=2, n_embd=16, sample_prompt=None)
    monitors = [ThroughputLogger(), ThroughputLogger(peak_flops=1e12)]
    trainer = cpu_trainer(
        tmp_path, max_steps=12, log_every_n_steps=2, callbacks=monitors, val_check_interval=6, limit_val_batches=1
    )
    trainer.fit(model, dm)
    plain, with_peak = (m.summary for m in monitors)
    assert plain["throughput/tokens_per_sec"] == pytest.approx(16 * plain["throughput/samples_per_sec"])
    assert "throughput/mfu" not in plain  # no invented CPU peak
    flops = plain["throughput/flops_per_sec"]
    assert flops == pytest.approx(plain["throughput/tokens_per_sec"] * model.flops_per_token(16))
    assert with_peak["throughput/mfu"] == pytest.approx(with_peak["throughput/flops_per_sec"] / 1e12)
    assert trainer.callback_metrics["throughput/tokens_per_sec"] > 0


def test_unencodable_sample_prompt_warns_instead_of_failing(tmp_path: Path) -> None:
    dm = TextDataModule(
        path=str(corpus(tmp_path)), tokenizer="char", block_size=16, batch_size=4, val_batches=1,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    model = CausalLM(vocab_size=dm.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16, sample_prompt="§")
    trainer = cpu_trainer(tmp_path, max_steps=2, val_check_interval=1)
    with pytest.warns(UserWarning, match="sample_prompt cannot be encoded"):
        trainer.fit(model, dm)
    assert trainer.global_step == 2 and "val/loss" in trainer.callback_metrics


def test_loads_checkpoints_with_the_fused_qkv_projection() -> None:
    """Checkpoints from before q, k, v became separate Linears (one ``c_attn``) load into the same model."""
    net = tiny_gpt()
    fused = {}
    for key, value in net.state_dict().items():
        if ".attn.q." in key:
            parts = [net.state_dict()[key.replace(".q.", f".{name}.")] for name in "qkv"]
            fused[key.replace(".q.", ".c_attn.")] = torch.cat(parts)
        elif ".attn.k." not in key and ".attn.v." not in key:
            fused[key] = value
    torch.manual_seed(1)
    other = GPT(net.config).eval()
    idx = torch.randint(0, net.config.vocab_size, (2, 8))
    assert not torch.equal(net.eval()(idx), other(idx))
    other.load_state_dict(fused)
    assert torch.equal(net(idx), other(idx))
