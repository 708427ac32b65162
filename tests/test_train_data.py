"""Training data as the loop sees it: uint32 token files, token ids checked in every batch read, and the built-in
corpus barrier that every process of a run must reach."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from deepseekmoe_jax import distributed
from deepseekmoe_jax.sharding import make_mesh
from deepseekmoe_jax.tokenizer import ByteTokenizer, tokenizer_from_arg
from deepseekmoe_jax.train import DataError, run_config_from_dict
from deepseekmoe_jax.train import inputs as inputs_lib
from deepseekmoe_jax.train.data import BatchSource, TokenDataset, global_batch, prepare

BIG_VOCAB = 70_000  # more ids than uint16 can hold


def _word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, BIG_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_uint32_token_files_prepare_and_read_back(tmp_path):
    _word_level_tokenizer(tmp_path / "tokenizer.json")
    docs = {
        "a.txt": [70_000 - 1, 65_535, 65_536, 3, 12],
        "b.txt": [66_000, 4, 69_998, 65_537],
    }
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, ids in docs.items():
        (corpus / name).write_text(" ".join(f"w{i}" for i in ids))
    tok = tokenizer_from_arg(str(tmp_path / "tokenizer.json"))
    assert tok.vocab_size == BIG_VOCAB and tok.eos_id == 2
    meta = prepare([str(corpus)], tmp_path / "data", tok, val_fraction=0.0, progress=False)

    assert meta["dtype"] == "uint32" and meta["vocab_size"] == BIG_VOCAB
    expected = np.array(docs["a.txt"] + [2] + docs["b.txt"] + [2])  # files in sorted order, each ending in eos
    assert meta["splits"]["train"]["max_token_id"] == expected.max() == 69_999
    raw = np.fromfile(tmp_path / "data" / "train.bin", dtype="<u4")
    np.testing.assert_array_equal(raw, expected)  # 4 bytes per id, nothing truncated to 16 bits

    ds = TokenDataset(tmp_path / "data")
    assert ds.dtype == np.dtype("<u4")
    split = ds.split("train")
    np.testing.assert_array_equal(np.asarray(split.tokens), expected)
    assert ds.check_model(BIG_VOCAB, 2) == []
    src = BatchSource(split, seq_len=4, seed=0, shuffle=False, vocab_size=BIG_VOCAB)
    rows = src.rows(0, src.num_windows)
    assert rows.dtype == np.int32
    for w in range(src.num_windows):
        np.testing.assert_array_equal(rows[w], expected[4 * w : 4 * w + 5])
    with pytest.raises(DataError, match="holds token id 69999 but the model's vocab_size is 65536"):
        ds.check_model(65_536, 2)


@pytest.fixture
def tampered(tmp_path):
    """A byte-level dataset whose train.bin had one id overwritten with 400 after `prepare`: dataset.json still
    says every id is below 259."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text("abcdefgh" * 16)
    meta = prepare([str(corpus)], tmp_path / "data", ByteTokenizer(), val_fraction=0.0, progress=False)
    assert meta["splits"]["train"]["max_token_id"] < 259
    path = tmp_path / "data" / "train.bin"
    tokens = np.fromfile(path, dtype="<u2")
    tokens[70] = 400
    tokens.tofile(path)
    return tmp_path / "data"


def test_token_ids_are_checked_in_every_batch(tampered):
    ds = TokenDataset(tampered)
    assert ds.check_model(300, 2) == []  # the metadata alone does not show the bad id
    src = BatchSource(ds.split("train"), seq_len=16, seed=0, shuffle=False, vocab_size=300)
    np.testing.assert_array_less(src.rows(0, 4), 300)  # windows 0..3 hold tokens 0..64: clean
    message = (
        r"train\.bin: token id 400 at position 70 \(sequence 4, window 4 = tokens 64\.\.80\) is not below the model's "
        r"vocab_size=300, although dataset\.json gives max_token_id=\d+: the token file does not match its metadata"
    )
    with pytest.raises(DataError, match=message):
        src.rows(0, 8)
    # The same error reaches the caller through the per-device callbacks that assemble a global batch.
    mesh = make_mesh(data=8)
    sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    with pytest.raises(DataError, match=message):
        global_batch(src, 0, (1, 8), sharding)
    # Without a vocabulary to check against, rows are returned as stored.
    assert BatchSource(ds.split("train"), 16, 0, shuffle=False).rows(4, 1)[0, 6] == 400


def test_ids_that_wrap_negative_in_int32_are_caught(tmp_path):
    from deepseekmoe_jax.train.data import TokenSplit

    tokens = np.arange(40, dtype="<u4") % 7
    tokens[13] = 2**32 - 5  # -5 once converted to int32, so it passes a check of the maximum alone
    split = TokenSplit("train", str(tmp_path / "train.bin"), tokens, documents=1, max_token_id=6)
    src = BatchSource(split, seq_len=8, seed=0, shuffle=False, vocab_size=100)
    assert src.checks_ids
    np.testing.assert_array_equal(src.rows(0, 1)[0], tokens[:9])  # window 0 is clean
    with pytest.raises(DataError, match=r"train\.bin: token id 4294967291 at position 13 \(sequence 1, window 1"):
        src.rows(0, 2)
    # Without the check, the row would have reached the model with a negative id.
    assert BatchSource(split, 8, 0, shuffle=False).rows(1, 1).min() == -5


def test_the_id_check_is_skipped_when_the_file_dtype_cannot_exceed_the_vocabulary(tmp_path):
    from deepseekmoe_jax.train.data import TokenSplit

    tokens = np.full(20, 65_535, dtype="<u2")
    split = TokenSplit("train", str(tmp_path / "train.bin"), tokens, documents=1, max_token_id=65_535)
    assert not BatchSource(split, 4, 0, shuffle=False, vocab_size=65_536).checks_ids
    assert BatchSource(split, 4, 0, shuffle=False, vocab_size=65_535).checks_ids
    with pytest.raises(DataError, match="token id 65535 at position 0"):
        BatchSource(split, 4, 0, shuffle=False, vocab_size=65_535).rows(0, 1)


def test_the_training_loop_checks_batches_against_the_model(tampered, tmp_path):
    raw = {
        "model": {"vocab_size": 300, "eos_token_id": 2},
        "train": {"run_dir": str(tmp_path / "run"), "batch_size": 8, "seq_len": 16, "eval_every": -1},
        "data": {"path": str(tampered)},
    }
    _, train_src, _ = inputs_lib.data_sources(run_config_from_dict(raw), lambda _m: None)
    with pytest.raises(DataError, match=r"token id 400 at position 70 .* vocab_size=300"):
        for first in range(0, train_src.num_windows, 8):
            train_src.rows(first, 8)


# ----------------------------------------------------------------------------------------------- corpus barrier
@pytest.fixture
def small_stdlib(tmp_path, monkeypatch):
    """The built-in corpus replaced by three small files, and the barrier recorded instead of run."""
    src = tmp_path / "lib"
    src.mkdir()
    for name in ("a.py", "b.py", "c.py"):
        (src / name).write_text(f"# {name}\n" + "x = 1\n" * 50)
    monkeypatch.setattr(inputs_lib, "stdlib_sources", lambda: sorted(str(p) for p in src.iterdir()))
    barriers = []
    monkeypatch.setattr(distributed, "barrier", barriers.append)
    raw = {
        "model": {"vocab_size": 512},
        "train": {"run_dir": str(tmp_path / "run")},
        "data": {"corpus": "python-stdlib", "val_fraction": 0.3},
    }
    return run_config_from_dict(raw), barriers


@pytest.mark.parametrize("process", [0, 1])
def test_every_process_reaches_the_corpus_barrier(small_stdlib, monkeypatch, process):
    run, barriers = small_stdlib
    target = f"{run.train.run_dir}/data"
    # First run: only process 0 prepares, and both meet at the barrier.
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert inputs_lib.resolve_dataset(run, lambda _m: None).directory == target
    before = (open(f"{target}/train.bin", "rb").read(), json.load(open(f"{target}/dataset.json")))
    # A later process (or a restart) that finds the finished dataset still meets the others at the same barrier,
    # and nothing is prepared again.
    monkeypatch.setattr(jax, "process_index", lambda: process)
    assert inputs_lib.resolve_dataset(run, lambda _m: None).directory == target
    assert barriers == ["built-in corpus prepared"] * 2
    assert (open(f"{target}/train.bin", "rb").read(), json.load(open(f"{target}/dataset.json"))) == before


def test_a_process_without_the_prepared_corpus_is_told_why(small_stdlib, monkeypatch):
    run, barriers = small_stdlib
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # process 1 never prepares; its disk has no dataset
    with pytest.raises(DataError, match=r"no dataset\.json: process 0 could not prepare the built-in corpus"):
        inputs_lib.resolve_dataset(run, lambda _m: None)
    assert barriers == ["built-in corpus prepared"]


def test_a_failed_preparation_is_raised_after_the_barrier(small_stdlib, monkeypatch):
    run, barriers = small_stdlib

    def no_sources():
        raise DataError("no Python source files found for the built-in corpus")

    monkeypatch.setattr(inputs_lib, "stdlib_sources", no_sources)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(DataError, match="no Python source files"):
        inputs_lib.resolve_dataset(run, lambda _m: None)
    assert barriers == ["built-in corpus prepared"]  # the other processes were not left waiting
