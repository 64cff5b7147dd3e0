"""Tests for the caption BPE tokenizer: training, id and slot layout, BPE-dropout, identity."""

from __future__ import annotations

import os
import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dalle_jax.tokenizers import bpe

WORDS = ("a an the red green blue yellow purple orange small large big tiny circle square "
         "triangle on top of left right below above next to and with striped dotted fluffy "
         "cat dog teapot sitting under picture photo").split()
VOCAB = 400  # 4 special + 256 bytes + ~30 characters leaves ~110 merges


def _corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bpe")


@pytest.fixture(scope="module")
def tok(model_dir) -> bpe.TextTokenizer:
    return bpe.TextTokenizer(bpe.train_bpe(_corpus(), str(model_dir / "main"), vocab_size=VOCAB))


@pytest.fixture(scope="module")
def tok_unk(model_dir) -> bpe.TextTokenizer:
    """A model without byte fallback: unknown characters become <unk>."""
    path = bpe.train_bpe(_corpus(), str(model_dir / "unk"), vocab_size=150, byte_fallback=False)
    return bpe.TextTokenizer(path)


ODD_TEXTS = ["  A Red   CAT\ton the\n\nMAT  ", "ＦＵＬＬＷＩＤＴＨ teapot", "zebra quiz",
             "a 🐱🐶 cat under 猫 the tree", "x", "ﬁsh café Ⅻ", "teapot▁dog"]


# --------------------------------------------------------------------------- layout


def test_id_layout(tok):
    sp = tok._sp
    assert tok.vocab_size == VOCAB
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(bpe.NUM_SPECIAL) == "<0x00>"
    assert sp.id_to_piece(bpe.NUM_SPECIAL + 255) == "<0xFF>"
    assert tok.text_vocab_size(16) == VOCAB + 16
    np.testing.assert_array_equal(tok.pad_ids(3), [VOCAB, VOCAB + 1, VOCAB + 2])


def test_round_trip(tok):
    for text in _corpus(50, seed=1) + ODD_TEXTS:
        ids = tok.encode(text)
        assert all(bpe.NUM_SPECIAL <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == bpe.normalize(text)
    assert bpe.normalize("  A Red   CAT\ton the\n\nMAT  ") == "a red cat on the mat"
    assert bpe.normalize("ＦＵＬＬ ﬁ") == "full fi"
    assert tok.encode(b"Red CAT") == tok.encode("red cat")
    # Frequent words became single pieces.
    assert len(tok.encode("the teapot")) < len("the teapot")


def test_slot_layout(tok):
    slots, info = tok.encode_slots("A red cat", text_len=16)
    ids = tok.encode("a red cat")
    assert slots.dtype == np.int32 and slots.shape == (16,)
    assert slots[0] == bpe.BOS_ID
    np.testing.assert_array_equal(slots[1: 1 + len(ids)], ids)
    p = np.arange(1 + len(ids), 16)
    np.testing.assert_array_equal(slots[p], tok.vocab_size + p)  # pad at slot p is V + p
    assert info == {"num_tokens": 1 + len(ids), "truncated": False, "num_unknown": 0}
    assert tok.decode(slots) == "a red cat"
    assert slots.max() < tok.text_vocab_size(16)


def test_truncation(tok):
    text = " ".join(["fluffy striped teapot"] * 20)
    ids = tok.encode(text)
    assert len(ids) > 9
    slots, info = tok.encode_slots(text, text_len=10)
    assert slots.shape == (10,) and slots[0] == bpe.BOS_ID
    np.testing.assert_array_equal(slots[1:], ids[:9])
    assert info["truncated"] and info["num_tokens"] == 10
    # Exactly text_len - 1 tokens fit; one more is cut.
    slots, info = tok.encode_slots(text, text_len=len(ids) + 1)
    assert not info["truncated"] and info["num_tokens"] == len(ids) + 1
    assert tok.decode(slots) == text
    _, info = tok.encode_slots(text, text_len=len(ids))
    assert info["truncated"] and info["num_tokens"] == len(ids)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", b""])
def test_empty_caption(tok, text):
    slots, info = tok.encode_slots(text, text_len=6)
    np.testing.assert_array_equal(slots, [bpe.BOS_ID] + list(tok.vocab_size + np.arange(1, 6)))
    assert info == {"num_tokens": 1, "truncated": False, "num_unknown": 0}
    assert tok.decode(slots) == ""


def test_unknown_characters_byte_fallback(tok):
    text = "a 🐱🐶 cat under 猫 the tree"
    slots, info = tok.encode_slots(text, text_len=64)
    assert info["num_unknown"] == 3  # two emoji and one CJK character, one count each
    assert tok.decode(slots) == text
    assert not np.isin(slots, [bpe.UNK_ID]).any()


def test_unknown_characters_unk(tok_unk):
    text = "a 🐱🐶 cat under 猫 the tree"
    ids = tok_unk.encode(text)
    assert ids.count(bpe.UNK_ID) == 2  # a run of unknown characters is one <unk>
    slots, info = tok_unk.encode_slots(text, text_len=64)
    assert info["num_unknown"] == 2
    decoded = tok_unk.decode(slots)
    assert "⁇" in decoded and decoded.startswith("a") and decoded.endswith("the tree")


# --------------------------------------------------------------------------- BPE-dropout


@pytest.mark.parametrize("which", ["tok", "tok_unk"])
def test_own_merges_equal_sentencepiece(which, request):
    """The merge loop behind BPE-dropout reproduces sentencepiece's encoding at dropout 0."""
    t = request.getfixturevalue(which)
    for text in _corpus(200, seed=2) + ODD_TEXTS:
        assert t.encode_dropout(text, dropout=0.0, rng_seed=0) == t.encode(text), text


def test_dropout_deterministic_and_varied(tok):
    text = "a fluffy striped teapot sitting on top of the yellow triangle"
    norm = bpe.normalize(text)
    plain = tok.encode(text)
    draws = [tok.encode_dropout(text, dropout=0.1, rng_seed=(7, 0, i)) for i in range(30)]
    again = [tok.encode_dropout(text, dropout=0.1, rng_seed=(7, 0, i)) for i in range(30)]
    assert draws == again
    assert all(tok.decode(d) == norm for d in draws)
    # Dropout only ever splits pieces: never fewer tokens than plain BPE.
    assert all(len(d) >= len(plain) for d in draws)
    # Other seeds draw other segmentations of the same text.
    assert tok.encode_dropout(text, dropout=0.1, rng_seed=(8, 0, 0)) != draws[0] or \
        tok.encode_dropout(text, dropout=0.1, rng_seed=(8, 0, 1)) != draws[1]
    # The fraction of merges applied falls as the dropout rate rises: the mean number of
    # pieces grows strictly from plain BPE's (p = 0) to one per character (p = 1), and
    # every draw decodes to the text.
    means = []
    for p in (0.0, 0.05, 0.2, 0.5, 1.0):
        lengths = []
        for i in range(100):
            d = tok.encode_dropout(text, dropout=p, rng_seed=(9, 0, i))
            assert tok.decode(d) == norm, (p, i)
            lengths.append(len(d))
        means.append(np.mean(lengths))
        assert np.all(np.asarray(lengths) >= len(plain)), p
    assert means[0] == len(plain) and means[-1] == len(norm) + 1
    assert all(a < b for a, b in zip(means, means[1:])), means
    # At a small rate most merges still apply: far nearer plain BPE than characters.
    assert means[1] - len(plain) < 0.25 * (len(norm) + 1 - len(plain)), means
    # Through the slot API, dropout 0 ignores the seed.
    for seed in (None, 3, (1, 2, 3)):
        slots, _ = tok.encode_slots(text, text_len=32, dropout=0.0, rng_seed=seed)
        np.testing.assert_array_equal(slots, tok.encode_slots(text, text_len=32)[0])
    # Dropout 1 drops every merge: one piece per character.
    assert len(tok.encode_dropout(text, dropout=1.0, rng_seed=0)) == len(norm) + 1
    # Seeds of any accepted form.
    ss = np.random.SeedSequence([7, 0, 3])
    assert tok.encode_dropout(text, dropout=0.1, rng_seed=ss) == draws[3]
    assert tok.encode_dropout(text, dropout=0.1, rng_seed=np.array([7, 0, 3])) == draws[3]
    assert tok.encode_dropout(text, dropout=0.1, rng_seed=np.int64(5)) == \
        tok.encode_dropout(text, dropout=0.1, rng_seed=5)


def test_dropout_independent_of_order_and_threads(tok):
    texts = _corpus(40, seed=3) + ["a 🐱 cat"]
    seeds = [(11, 2, i) for i in range(len(texts))]
    ref, ref_info = tok.encode_batch_slots(texts, text_len=24, dropout=0.1, seeds=seeds)
    order = np.random.default_rng(0).permutation(len(texts))
    perm, perm_info = tok.encode_batch_slots([texts[i] for i in order], text_len=24, dropout=0.1,
                                             seeds=[seeds[i] for i in order])
    np.testing.assert_array_equal(perm, ref[order])
    for k in ref_info:
        np.testing.assert_array_equal(perm_info[k], ref_info[k][order])

    def one(i):
        return tok.encode_slots(texts[i], text_len=24, dropout=0.1, rng_seed=seeds[i])[0]

    with ThreadPoolExecutor(2) as pool:
        threaded = np.stack(list(pool.map(one, reversed(range(len(texts))))))[::-1]
    np.testing.assert_array_equal(threaded, ref)
    # A pickled copy (as shipped to worker processes) encodes the same.
    copy = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(
        copy.encode_batch_slots(texts, text_len=24, dropout=0.1, seeds=seeds)[0], ref)
    assert ref_info["num_tokens"].dtype == np.int32 and ref_info["truncated"].dtype == bool
    assert ref_info["num_unknown"][-1] == 1


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="text_len"):
        tok.encode_slots("a cat", text_len=1)
    with pytest.raises(ValueError, match="rng_seed"):
        tok.encode_slots("a cat", text_len=8, dropout=0.1)
    with pytest.raises(ValueError, match="probability"):
        tok.encode_slots("a cat", text_len=8, dropout=1.5, rng_seed=0)
    with pytest.raises(ValueError, match="seeds"):
        tok.encode_batch_slots(["a", "b"], text_len=8, dropout=0.1)
    with pytest.raises(ValueError, match="2 texts"):
        tok.encode_batch_slots(["a", "b"], text_len=8, dropout=0.1, seeds=[1])


# --------------------------------------------------------------------------- identity, training


def test_identity(tok, tok_unk):
    ident = tok.identity()
    assert ident["vocab_size"] == VOCAB and ident["byte_fallback"]
    tok.check_identity(ident)
    tok.check_identity(pickle.loads(pickle.dumps(tok)).identity())
    assert tok_unk.identity()["sha256"] != ident["sha256"]
    with pytest.raises(ValueError, match="sha256") as e:
        tok.check_identity(tok_unk.identity())
    assert "vocab_size" in str(e.value) and "byte_fallback" in str(e.value)


def test_training_is_reproducible_and_never_overwrites(tok, model_dir):
    prefix = str(model_dir / "main")
    before = os.stat(prefix + ".model").st_mtime_ns
    assert bpe.train_bpe(_corpus(), prefix, vocab_size=VOCAB) == prefix + ".model"
    assert os.stat(prefix + ".model").st_mtime_ns == before  # identical model left alone
    with pytest.raises(FileExistsError, match="different"):
        bpe.train_bpe(_corpus(), prefix, vocab_size=VOCAB - 20)
    assert bpe.TextTokenizer(prefix + ".model").sha256 == tok.sha256
    assert not [f for f in os.listdir(model_dir) if ".tmp" in f]


def test_train_from_source_with_bytes_captions(tmp_path):
    records = [{"caption": c.upper().encode("utf-8"), "image": None} for c in _corpus(800)]
    path = bpe.train_bpe_from_source(records, str(tmp_path / "sub" / "src"), vocab_size=350,
                                     max_examples=500, seed=1)
    t = bpe.TextTokenizer(path)
    assert t.vocab_size == 350
    assert t.decode(t.encode("A RED Cat")) == "a red cat"
    # The same subset (same seed) gives the same model.
    again = bpe.train_bpe_from_source(records, str(tmp_path / "again"), vocab_size=350,
                                      max_examples=500, seed=1)
    assert bpe.TextTokenizer(again).sha256 == t.sha256
    with pytest.raises(KeyError, match="text"):
        bpe.train_bpe_from_source(records, str(tmp_path / "bad"), vocab_size=350, field="text")


def test_training_errors(tmp_path):
    corpus = _corpus(300)
    with pytest.raises(ValueError, match="too large for this corpus.*at most"):
        bpe.train_bpe(corpus, str(tmp_path / "big"), vocab_size=5000)
    assert not os.path.exists(tmp_path / "big.model")
    small = bpe.TextTokenizer(bpe.train_bpe(corpus, str(tmp_path / "soft"), vocab_size=5000,
                                            strict_vocab_size=False))
    assert 300 < small.vocab_size < 5000
    with pytest.raises(ValueError, match="too small"):
        bpe.train_bpe(corpus, str(tmp_path / "tiny"), vocab_size=270)
    with pytest.raises(ValueError, match="reserved"):
        bpe.train_bpe(corpus, str(tmp_path / "tiny"), vocab_size=200)
    with pytest.raises(ValueError, match="no non-empty"):
        bpe.train_bpe(["", "  "], str(tmp_path / "empty"), vocab_size=300)
    with pytest.raises(FileNotFoundError, match="train_bpe"):
        bpe.TextTokenizer(str(tmp_path / "missing.model"))
