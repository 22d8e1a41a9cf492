"""TextDataModule and tokenizers: cached shards, exact round trips, windows per rank/epoch, resume, errors."""

import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightscale.data import text as text_module
from lightscale.data.corpus import list_corpus, token_dtype
from lightscale.data.text import TextDataModule
from lightscale.data.tokenizers import ByteTokenizer, CharTokenizer, TiktokenTokenizer
from lightscale.data.windows import TokenWindows

PARAGRAPH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
)


def make_dm(tmp_path: Path, **kwargs) -> TextDataModule:
    defaults = {"block_size": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), "val_batches": 2}
    return TextDataModule(**{**defaults, **kwargs})


def corpus_file(tmp_path: Path, text: str = PARAGRAPH * 20, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def stdlib_text(dm: TextDataModule) -> bytes:
    """The corpus as the DataModule should have read it (stdlib: skipping the few non-UTF-8 files)."""
    parts = []
    for f in dm.files:
        data = f.path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(data)
    return b"".join(parts)


def shard_tokens(dm: TextDataModule) -> np.ndarray:
    dtype = token_dtype(dm.vocab_size)
    return np.concatenate([np.fromfile(dm.shard_dir / f"{s}.bin", dtype=dtype) for s in ("train", "val")])


# ---------------------------------------------------------------------------------------- preparation


def test_byte_shards_are_exact_split_and_idempotent(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, max_bytes=300_000)  # the stdlib corpus, capped for speed
    assert dm.vocab_size == 256
    dm.prepare_data()
    files = sorted(dm.shard_dir.iterdir())
    assert [f.name for f in files] == ["meta.json", "train.bin", "val.bin"]
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}

    expected = stdlib_text(dm)
    tokens = shard_tokens(dm)
    assert tokens.dtype == np.uint8 and tokens.tobytes() == expected  # lossless, in corpus order
    n_train = (dm.shard_dir / "train.bin").stat().st_size
    assert n_train == int(len(expected) * 0.9)  # nanoGPT's split: the last 10% validate
    assert ByteTokenizer().decode(tokens) == expected.decode("utf-8")

    make_dm(tmp_path, max_bytes=300_000).prepare_data()  # a fresh instance finds the cache: nothing rewritten
    assert {f.name: f.stat().st_mtime_ns for f in dm.shard_dir.iterdir()} == mtimes
    assert not [p for p in dm.cache_dir.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_char_shards_round_trip_and_vocab_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = make_dm(tmp_path, tokenizer="char", max_bytes=300_000)
    expected = stdlib_text(dm).decode("utf-8")
    assert dm.vocab_size == len(set(expected))  # known right after __init__ (the CLI links it)
    dm.prepare_data()
    assert (dm.shard_dir / "vocab.json").exists()
    tokens = shard_tokens(dm)
    assert tokens.dtype == np.uint8 if dm.vocab_size <= 256 else np.uint16
    assert dm.tokenizer.decode(tokens) == expected

    def no_scan(*args, **kwargs):
        raise AssertionError("the alphabet should come from vocab.json")

    monkeypatch.setattr(text_module, "scan_alphabet", no_scan)
    again = make_dm(tmp_path, tokenizer="char", max_bytes=300_000)
    assert again.tokenizer.chars == dm.tokenizer.chars


def test_a_changed_file_gets_a_new_cache(tmp_path: Path) -> None:
    path = corpus_file(tmp_path)
    first = make_dm(tmp_path, path=str(path))
    first.prepare_data()
    path.write_text(PARAGRAPH * 21)
    second = make_dm(tmp_path, path=str(path))
    assert second.shard_dir != first.shard_dir
    second.prepare_data()
    assert len(shard_tokens(second)) == len(PARAGRAPH * 21)


def test_a_failed_preparation_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = make_dm(tmp_path, path=str(corpus_file(tmp_path)), tokenizer="char")

    def crash(text: str) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(dm.tokenizer, "encode", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert [p.name for p in dm.cache_dir.iterdir()] == ["hashes.json"]  # neither shards nor a temp folder


def test_folder_corpus_in_sorted_order_skipping_hidden_files(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_text("second ")
    (folder / "a.txt").write_text("first ")
    (folder / ".hidden").write_text("never ")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.txt").write_text("never ")
    (folder / "c.md").write_text("third " * 10)
    (folder / "link.txt").symlink_to(folder / "nowhere")  # a dangling link is not a file
    files = list_corpus(folder)
    assert [f.path.name for f in files] == ["a.txt", "2.txt", "c.md"]
    assert [f.path.name for f in list_corpus(folder, pattern="*.txt")] == ["a.txt", "2.txt"]
    with pytest.raises(ValueError, match=r"no non-empty files matching '\*\.TXT'"):  # names match case-sensitively
        list_corpus(folder, pattern="*.TXT")
    assert [f.path.name for f in list_corpus(folder, pattern="b/*.txt")] == ["2.txt"]  # a pattern over paths
    dm = make_dm(tmp_path, path=str(folder), block_size=4)
    dm.prepare_data()
    assert shard_tokens(dm).tobytes() == b"first second " + b"third " * 10


def test_token_dtype_is_the_smallest_that_fits() -> None:
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# ---------------------------------------------------------------------------------------- errors


def test_missing_path_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt"):
        make_dm(tmp_path, path=str(tmp_path / "nowhere.txt"))


@pytest.mark.parametrize("kind", ["empty file", "empty folder"])
def test_empty_corpus_is_a_value_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "corpus"
    if kind == "empty file":
        path.write_text("")
    else:
        path.mkdir()
    dm = make_dm(tmp_path, path=str(path))
    with pytest.raises(ValueError, match="empty"):
        dm.prepare_data()


def test_undecodable_bytes_need_the_byte_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème\n".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8.*byte"):
        _ = make_dm(tmp_path, path=str(path), tokenizer="char").vocab_size
    dm = make_dm(tmp_path, path=str(path), tokenizer="byte")
    dm.setup("fit")  # prepares on demand outside a Trainer
    assert shard_tokens(dm).tobytes() == path.read_bytes()


@pytest.mark.parametrize(("length", "split"), [(15, "train"), (120, "val")])
def test_corpus_shorter_than_a_block_is_a_value_error(tmp_path: Path, length: int, split: str) -> None:
    dm = make_dm(tmp_path, path=str(corpus_file(tmp_path, "x" * length)), block_size=16)
    with pytest.raises(ValueError, match=rf"the {split} split .* fewer than block_size \+ 1 = 17"):
        dm.setup("fit")


def test_tokenizer_errors_and_lossy_decoding() -> None:
    tokenizer = CharTokenizer("abc")
    with pytest.raises(ValueError, match="'z'"):
        tokenizer.encode("abz")
    assert tokenizer.decode(tokenizer.encode("cab")) == "cab"
    assert ByteTokenizer().decode([0xC3]) == "\ufffd"  # half a character from a model: replaced, no crash


def test_gpt2_tokenizer_round_trips_or_fails_in_one_line() -> None:
    pytest.importorskip("tiktoken")
    try:
        tokenizer = TiktokenTokenizer("gpt2")
    except RuntimeError as error:  # offline machine without a tiktoken cache
        assert "\n" not in str(error) and "TIKTOKEN_CACHE_DIR" in str(error)
        return
    text = "def f(x):\n    return x + 1  # ünïcode"
    assert tokenizer.vocab_size == 50257 and tokenizer.decode(tokenizer.encode(text)) == text


# ---------------------------------------------------------------------------------------- windows


def prepared(tmp_path: Path, **kwargs) -> TextDataModule:
    dm = make_dm(tmp_path, path=str(corpus_file(tmp_path)), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_training_windows_are_real_slices_of_the_train_split(tmp_path: Path) -> None:
    dm = prepared(tmp_path)
    train = np.fromfile(dm.shard_dir / "train.bin", dtype=np.uint8)
    batch = next(iter(dm.train_loader_for(1, 0)))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    offsets = dm.train_set.offsets(range(4))
    for row, offset in zip(batch.numpy(), offsets, strict=True):
        assert 0 <= offset <= len(train) - 17
        np.testing.assert_array_equal(row, train[offset : offset + 17])


def test_windows_differ_across_ranks_and_epochs(tmp_path: Path) -> None:
    dm = prepared(tmp_path, train_samples_per_epoch=64)
    loaders = [dm.train_loader_for(2, rank) for rank in (0, 1)]
    ids = [list(loader.sampler) for loader in loaders]
    assert len(ids[0]) == len(ids[1]) == 32 and not set(ids[0]) & set(ids[1])
    rank0, rank1 = (torch.cat(list(loader)) for loader in loaders)
    assert rank0.shape == rank1.shape == (32, 17)
    assert not torch.equal(rank0, rank1)
    loaders[0].sampler.set_epoch(1)
    assert not set(loaders[0].sampler) & set(ids[0])  # a new epoch draws new windows
    assert not torch.equal(torch.cat(list(loaders[0])), rank0)


def test_training_stream_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first = torch.cat(list(prepared(tmp_path, train_samples_per_epoch=16).train_loader_for(1, 0)))
    second = torch.cat(list(prepared(tmp_path, train_samples_per_epoch=16).train_loader_for(1, 0)))
    other = torch.cat(list(prepared(tmp_path, train_samples_per_epoch=16, seed=1).train_loader_for(1, 0)))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_validation_windows_are_fixed_across_instances(tmp_path: Path) -> None:
    batches = [list(prepared(tmp_path, val_batches=3).val_dataloader()) for _ in range(2)]
    assert len(batches[0]) == 3
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a, b)
    train_first = next(iter(prepared(tmp_path).train_loader_for(1, 0)))
    assert not torch.equal(batches[0][0], train_first)


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_loader_resumes_mid_epoch_exactly(tmp_path: Path, workers: int) -> None:
    dm = prepared(tmp_path, train_samples_per_epoch=40, num_workers=workers)
    loader = dm.train_loader_for(1, 0)
    reference = list(loader)
    interrupted = dm.train_loader_for(1, 0)
    iterator = iter(interrupted)
    for _ in range(3):
        next(iterator)
    state = interrupted.state_dict()
    resumed = dm.train_loader_for(1, 0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 3
    for a, b in zip(rest, reference[3:], strict=True):
        assert torch.equal(a, b)


def test_memmap_is_not_pickled_with_the_dataset(tmp_path: Path) -> None:
    import pickle

    dm = prepared(tmp_path)
    dm.train_set[0]  # opens the memmap
    clone = pickle.loads(pickle.dumps(dm.train_set))
    assert clone._tokens is None and len(pickle.dumps(dm.train_set)) < 2000
    assert torch.equal(clone[5], dm.train_set[5])


def test_token_windows_reject_a_too_short_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.bin"
    np.arange(10, dtype=np.uint8).tofile(path)
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenWindows(path, "uint8", block_size=10, length=4)


def test_predict_dataloader_serves_encoded_prompts(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, path=str(corpus_file(tmp_path)), tokenizer="char", prompts=["It was", "age"])
    dm.prepare_data()
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [dm.tokenizer.decode(b[0]) for b in batches] == ["It was", "age"]
    assert batches[0].shape == (1, 6)


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = batch.clone()


def test_trainer_resume_replays_the_same_windows(tmp_path: Path) -> None:
    """A checkpoint taken mid-epoch resumes the training stream where it stopped (Lightning + torchdata)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightscale.models.causal_lm import CausalLM
    from lightscale.schedules import WarmupCosine

    def fit(max_steps: int, ckpt_path: str | None = None) -> RecordBatches:
        L.seed_everything(0)
        recorder = RecordBatches()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
        trainer = L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[recorder, checkpoint],
            default_root_dir=tmp_path,
        )
        model = CausalLM(
            block_size=16,
            n_layer=1,
            n_head=2,
            n_embd=16,
            sample_prompt=None,
            scheduler=partial(WarmupCosine, warmup_steps=2),
        )
        trainer.fit(model, make_dm(tmp_path, path=str(corpus), train_samples_per_epoch=40), ckpt_path=ckpt_path)
        return recorder

    corpus = corpus_file(tmp_path)
    full = fit(max_steps=7)
    resumed = fit(max_steps=7, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert sorted(resumed.batches) == [3, 4, 5, 6]
    for step, batch in resumed.batches.items():
        assert torch.equal(batch, full.batches[step]), step
    assert os.path.exists(tmp_path / "ckpt" / "epoch=0-step=6.ckpt")


def test_the_stdlib_corpus_leaves_out_installed_packages_and_caches() -> None:
    files = list_corpus(None, max_bytes=1 << 40)  # no cap: every stdlib source
    parts = {part for f in files for part in f.path.parts}
    assert {"site-packages", "dist-packages", "__pycache__"}.isdisjoint(parts)
    assert {"json", "email"} <= parts and all(f.path.suffix == ".py" for f in files)
