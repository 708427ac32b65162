"""Token files and `prepare`: byte-level and tokenizer.json datasets, deterministic order, per-process rows, errors."""

import json
import os

import numpy as np
import pytest

from deepseekmoe_jax.tokenizer import (
    BYTE_EOS_ID,
    BYTE_OFFSET,
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_arg,
)
from deepseekmoe_jax.train.data import (
    BatchSource,
    DataError,
    TokenDataset,
    global_batch,
    permute,
    prepare,
)

TEXTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n",
    "b.txt": "Grüße aus Köln — naïve café.\n",
    "c.txt": "def f(x):\n    return x * 2\n",
    "d.txt": "Pack my box with five dozen liquor jugs.\n",
}


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, (name, text) in enumerate(TEXTS.items()):
        (root / ("sub" if i % 2 else "") / name).write_text(text, encoding="utf-8")
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    return root


def _documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends, strict=True)]


def test_prepare_bytes_roundtrip(corpus, tmp_path):
    out = tmp_path / "data"
    meta = prepare([str(corpus)], out, ByteTokenizer(), val_fraction=0.3, progress=False)
    ds = TokenDataset(out)
    assert ds.dtype == np.dtype("<u2") and ds.vocab_size == 259 and ds.eos_id == BYTE_EOS_ID
    assert meta["tokenizer"]["type"] == "bytes" and meta["tokenizer"]["offset"] == BYTE_OFFSET
    tok = load_tokenizer(ds.tokenizer, out)
    decoded = []
    for split in ("train", "val"):
        s = ds.split(split)
        docs = _documents(np.asarray(s.tokens), ds.eos_id)
        assert len(docs) == s.documents == meta["splits"][split]["documents"]
        assert s.num_tokens == sum(len(d) + 1 for d in docs)
        decoded += [tok.decode(d) for d in docs]
    # Every document comes back exactly once, byte for byte (UTF-8 included); the hidden file is skipped.
    assert sorted(decoded) == sorted(TEXTS.values())
    assert ds.split("val").documents >= 1 and ds.split("train").documents >= 1
    # Byte b is stored as b + 3.
    raw = (corpus / "a.txt").read_bytes()
    assert any(
        np.array_equal(d, np.frombuffer(raw, np.uint8) + 3)
        for d in _documents(np.concatenate([np.asarray(ds.split(n).tokens) for n in ("train", "val")]), ds.eos_id)
    )


def test_prepare_is_deterministic_and_never_overwrites(corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare([str(corpus)], a, ByteTokenizer(), val_fraction=0.3, progress=False)
    prepare([str(corpus)], b, ByteTokenizer(), val_fraction=0.3, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    before = (a / "train.bin").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        prepare([str(corpus)], a, ByteTokenizer(), progress=False)
    assert (a / "train.bin").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary leftovers


def _train_bpe(path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts * 20, trainer)
    tok.save(str(path))
    return tok


def test_prepare_with_tokenizer_json(corpus, tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    reference = _train_bpe(tok_path, list(TEXTS.values()))
    out = tmp_path / "data"
    meta = prepare([str(corpus)], out, tokenizer_from_arg(str(tok_path)), val_fraction=0.0, progress=False)
    eos = reference.token_to_id("</s>")
    assert meta["eos_id"] == eos and meta["bos_id"] == reference.token_to_id("<s>")
    assert meta["vocab_size"] == reference.get_vocab_size() and meta["dtype"] == "uint16"
    ds = TokenDataset(out)
    assert ds.split("val").num_tokens == 0
    docs = _documents(np.asarray(ds.split("train").tokens), eos)
    # Each document is exactly the reference tokenizer's encoding of the file, then eos.
    expected = sorted(tuple(reference.encode(t, add_special_tokens=False).ids) for t in TEXTS.values())
    assert sorted(tuple(int(x) for x in d) for d in docs) == expected
    assert (out / "tokenizer.json").read_bytes() == tok_path.read_bytes()
    back = load_tokenizer(ds.tokenizer, out)
    assert sorted(back.decode(d) for d in docs) == sorted(TEXTS.values())


def test_tokenizer_json_errors(tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    _train_bpe(tok_path, ["hello world"])
    with pytest.raises(TokenizerError, match="<end>"):
        HFTokenizer(tok_path, eos_token="<end>")
    with pytest.raises(TokenizerError, match="no such file"):
        tokenizer_from_arg(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        HFTokenizer(bad)


def test_prepare_jsonl(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(5)) + "\n")
    meta = prepare([str(src)], tmp_path / "d", ByteTokenizer(), val_fraction=0.0, progress=False)
    assert meta["splits"]["train"]["documents"] == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1.*'text'"):
        prepare([str(bad)], tmp_path / "e", ByteTokenizer(), progress=False)
    assert not (tmp_path / "e").exists()


def test_prepare_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        prepare([str(tmp_path / "empty")], tmp_path / "out", ByteTokenizer(), progress=False)
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "nope")], tmp_path / "out", ByteTokenizer(), progress=False)
    assert not (tmp_path / "out").exists()


def test_truncated_token_file_is_reported(corpus, tmp_path):
    out = tmp_path / "data"
    prepare([str(corpus)], out, ByteTokenizer(), val_fraction=0.0, progress=False)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"train.bin.*incomplete"):
        TokenDataset(out)
    with pytest.raises(DataError, match="no dataset.json"):
        TokenDataset(tmp_path)


def test_token_ids_must_fit_the_model(corpus, tmp_path):
    out = tmp_path / "data"
    prepare([str(corpus)], out, ByteTokenizer(), val_fraction=0.0, progress=False)
    ds = TokenDataset(out)
    with pytest.raises(DataError, match=r"token id \d+ but the model's vocab_size is 100"):
        ds.check_model(vocab_size=100, eos_token_id=2)
    assert ds.check_model(vocab_size=512, eos_token_id=2) == []
    assert "eos" in ds.check_model(vocab_size=512, eos_token_id=7)[0]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
    for epoch in (0, 1):
        p = permute(np.arange(n), n, seed=3, epoch=epoch)
        assert sorted(p.tolist()) == list(range(n))
    if n >= 17:
        a, b = permute(np.arange(n), n, 3, 0), permute(np.arange(n), n, 3, 1)
        assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(n))


def _split(tmp_path, n_tokens):
    from deepseekmoe_jax.train.data import TokenSplit

    tokens = np.arange(n_tokens, dtype=np.uint16)
    return TokenSplit("train", str(tmp_path / "train.bin"), tokens, 1, n_tokens - 1)


def test_batch_source_order_resumes_and_covers_every_window(tmp_path):
    split = _split(tmp_path, 8 * 50 + 1)
    src = BatchSource(split, seq_len=8, seed=0)
    assert src.num_windows == 50
    whole = src.rows(0, 120)  # two full epochs and a bit
    # Rows are windows of seq_len + 1 consecutive tokens starting at multiples of seq_len.
    assert np.all(np.diff(whole, axis=1) == 1) and np.all(whole[:, 0] % 8 == 0)
    # Each epoch visits every window exactly once, in a different order.
    e0, e1 = whole[:50, 0] // 8, whole[50:100, 0] // 8
    assert sorted(e0.tolist()) == list(range(50)) == sorted(e1.tolist())
    assert not np.array_equal(e0, e1)
    # Reading from any position gives the same rows: the position is the whole data state.
    assert np.array_equal(src.rows(37, 40), whole[37:77])
    assert np.array_equal(BatchSource(split, 8, seed=0).rows(0, 120), whole)
    assert not np.array_equal(BatchSource(split, 8, seed=1).rows(0, 50), whole[:50])


def test_batch_source_too_short(tmp_path):
    with pytest.raises(DataError, match="cannot fill one sequence"):
        BatchSource(_split(tmp_path, 8), seq_len=8, seed=0)


def test_global_batch_reads_only_the_devices_rows(tmp_path):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from deepseekmoe_jax.sharding import make_mesh

    split = _split(tmp_path, 16 * 100 + 1)
    src = BatchSource(split, seq_len=16, seed=0)
    mesh = make_mesh(data=4, expert=2)
    sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp", "expert")))
    arr = global_batch(src, 24, (2, 8), sharding)
    assert arr.shape == (2, 8, 17)
    expected = src.rows(24, 16).reshape(2, 8, 17)
    assert np.array_equal(np.asarray(arr), expected)
    # One batch row per device: each shard holds exactly its own row.
    for shard in arr.addressable_shards:
        assert shard.data.shape == (2, 1, 17)
        assert np.array_equal(np.asarray(shard.data), expected[shard.index])
    assert len(jax.devices()) == 8
