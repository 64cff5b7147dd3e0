"""OpenAI CLIP import: the BPE tokenizer against Hugging Face's CLIPTokenizer, weight
conversion against a tiny random `transformers.CLIPModel` (Hugging Face keys, OpenAI keys
through torch.save, a TorchScript archive), the scorer export round trip, and the errors
for checkpoints that do not fit. Nothing is downloaded: every file is made here."""

import collections
import dataclasses
import gzip
import json

import jax
import numpy as np
import pytest
import regex
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from dalle_jax import exports
from dalle_jax.models import clip
from dalle_jax.rerank import clip_tokenizer, openai_clip

SENTENCES = [
    "A photo of a cat sitting on the mat.",
    "Two dogs playing in the snow!",
    "an armchair in the shape of an avocado",
    "the quick brown fox jumps over the lazy dog",
    "it's a small world; we're all here, aren't we?",
    "3 red cubes and 12 blue spheres on a wooden table",
    "a painting of a lighthouse at night, in the style of van gogh",
    "an illustration of a baby daikon radish in a tutu walking a dog",
    "a store front that has the word 'openai' written on it",
    "the exact same cat on the top as a sketch on the bottom",
    "café crème, naïve façade, 東京の夜景",
]

TEXTS = [
    "A photo of a CAT!!",
    "  it's   3 dogs\t\n and\u00a0a cat  ",
    "",
    "café naïve 東京 😀 emoji",
    "Hello, World... 1234567890",
    "we'll they've I'd you're she's don't I'm",
    "cafe\u0301 (decomposed accent)",
    "an ARMCHAIR in the shape of an Avocado.",
    "punctuation: ;,.!?-_()[]{}<>@#$%^&*+=~`|\\/\"",
    "x" * 40,
    "ÀÉÎÕÜ ß ø ł",
]
# Texts whose cleanup differs between OpenAI's tokenizer (ftfy, HTML unescaping) and the
# tokenizers-backed CLIPTokenizer (NFC only): compared after our cleanup.
TEXTS_CLEANED = [
    "fish &amp; chips &lt;3",
    "&amp;amp; twice",
    "it\u2019s \u201cquoted\u201d",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "mojibake: cafÃ©",
]


def _learn_merges(sentences, num_merges):
    """A small BPE merge list learned from ``sentences`` the OpenAI way (byte characters,
    ``</w>`` on each piece's last symbol, most frequent pair first)."""
    pattern = regex.compile(clip_tokenizer.PATTERN, regex.IGNORECASE)
    table = clip_tokenizer.bytes_to_unicode()
    words = collections.Counter()
    for s in sentences:
        for piece in pattern.findall(s.lower()):
            symbols = [table[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


@pytest.fixture(scope="module")
def merges_file(tmp_path_factory):
    merges = _learn_merges(SENTENCES, 300)
    assert len(merges) > 150
    path = tmp_path_factory.mktemp("bpe") / "merges.txt"
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(merges_file):
    return clip_tokenizer.ClipTokenizer(merges_file)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, merges_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tok")
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    (folder / "merges.txt").write_text(open(merges_file, encoding="utf-8").read(),
                                       encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- tokenizer


def test_vocabulary_layout(tokenizer):
    from tokenizers import pre_tokenizers

    m = tokenizer.num_merges
    assert tokenizer.vocab_size == 512 + m + 2
    assert (tokenizer.sot_id, tokenizer.eot_id) == (512 + m, 513 + m)
    enc = tokenizer.encoder
    # OpenAI's order: printable bytes from '!', then the others from U+0100.
    assert enc["!"] == 0 and enc["a"] == 64 and enc["a</w>"] == 320
    assert enc["¡"] == 94 and enc["Ā"] == 188 and enc["Ġ"] == 220
    assert set(list(enc)[:256]) == set(pre_tokenizers.ByteLevel.alphabet())
    assert list(enc)[256:512] == [c + "</w>" for c in list(enc)[:256]]
    assert tokenizer.encode("a") == [320]


def test_matches_hugging_face(tokenizer, hf_tokenizer):
    for text in TEXTS:
        ours = [tokenizer.sot_id] + tokenizer.encode(text) + [tokenizer.eot_id]
        assert ours == hf_tokenizer(text)["input_ids"], text
    for text in TEXTS_CLEANED:
        ours = [tokenizer.sot_id] + tokenizer.encode(text) + [tokenizer.eot_id]
        assert ours == hf_tokenizer(clip_tokenizer.clean_text(text))["input_ids"], text
    assert clip_tokenizer.clean_text("fish &amp;amp; chips") == "fish & chips"
    assert clip_tokenizer.clean_text("it\u2019s  A\tTEST ") == "it's a test"


def test_encode_batch(tokenizer):
    texts = ["a cat", "", "a photo of a cat sitting on the mat and a dog"]
    tokens, eot, truncated = tokenizer.encode_batch(texts, context_length=8)
    assert tokens.shape == (3, 8) and tokens.dtype == np.int32
    assert eot.dtype == np.int32 and truncated.dtype == np.bool_
    ids = tokenizer.encode("a cat")
    np.testing.assert_array_equal(
        tokens[0], [tokenizer.sot_id, *ids, tokenizer.eot_id] + [0] * (6 - len(ids)))
    np.testing.assert_array_equal(tokens[1], [tokenizer.sot_id, tokenizer.eot_id] + [0] * 6)
    long_ids = tokenizer.encode(texts[2])
    assert len(long_ids) > 6
    np.testing.assert_array_equal(tokens[2], [tokenizer.sot_id, *long_ids[:6],
                                              tokenizer.eot_id])
    np.testing.assert_array_equal(eot, [len(ids) + 1, 1, 7])
    np.testing.assert_array_equal(truncated, [False, False, True])
    with pytest.raises(TypeError):
        tokenizer.encode_batch("a cat")
    assert tokenizer.decode(tokenizer.encode("A photo, of a cat!")) == "a photo , of a cat !"


def test_merges_file_forms(tokenizer, merges_file, tmp_path):
    gz = tmp_path / clip_tokenizer.OPENAI_MERGES_FILE
    gz.write_bytes(gzip.compress(open(merges_file, "rb").read()))
    from_gz = clip_tokenizer.ClipTokenizer(str(gz))
    assert from_gz.encoder == tokenizer.encoder
    assert from_gz.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    few = clip_tokenizer.ClipTokenizer(merges_file, num_merges=10)
    assert few.vocab_size == 524 and few.eot_id == 523
    ident = tokenizer.identity()
    assert ident["type"] == "openai_clip_bpe" and ident["file"] == "merges.txt"
    assert ident["vocab_size"] == tokenizer.vocab_size and len(ident["sha256"]) == 64
    assert from_gz.identity()["sha256"] != ident["sha256"]
    with pytest.raises(ValueError, match="num_merges"):
        clip_tokenizer.ClipTokenizer(merges_file, num_merges=10_000)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt\.gz.*bpe_simple_vocab_16e6"):
        clip_tokenizer.ClipTokenizer(str(tmp_path / "nowhere.txt.gz"))
    bad = tmp_path / "bad.txt"
    bad.write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="two symbols"):
        clip_tokenizer.ClipTokenizer(str(bad))


# ----------------------------------------------------------------------------- weights


def _hf_model(vocab_size, *, width=128, heads=2, seed=0):
    """A tiny random CLIPModel with every tensor (layer norms and biases too) perturbed,
    so that a mis-mapped tensor shows."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=2, num_attention_heads=heads,
                         max_position_embeddings=16, hidden_act="quick_gelu",
                         eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2,
                         pad_token_id=0),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                           num_attention_heads=heads, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=32)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_to_openai_names(sd):
    """Hugging Face CLIP keys renamed to OpenAI's (written independently of the importer)."""
    out = {"logit_scale": sd["logit_scale"]}
    for tower, prefix in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
        n = len({k.split(".")[3] for k in sd if k.startswith(f"{tower}.encoder.layers.")})
        for i in range(n):
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            a = src + "self_attn."
            out[dst + "attn.in_proj_weight"] = torch.cat(
                [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]])
            out[dst + "attn.in_proj_bias"] = torch.cat(
                [sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]])
            for s, d in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj")):
                for kind in ("weight", "bias"):
                    out[f"{dst}{d}.{kind}"] = sd[f"{src}{s}.{kind}"]
    t, v = "text_model.", "vision_model."
    out.update({
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"],
        "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
    })
    return out


def _features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


def _inputs(vocab_size, seed=0):
    """Random CLIP-normalised pixels and token rows ``[ids..., EOT, 0...]`` whose EOT (the
    largest id, the HF config's eos_token_id) sits at ``eot``."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    eot = np.array([1, 6, 15], np.int32)
    tokens = rng.integers(1, vocab_size - 1, (3, 16)).astype(np.int64)
    for r, e in enumerate(eot):
        tokens[r, e] = vocab_size - 1
        tokens[r, e + 1:] = 0
    return pixels, tokens, eot


def _check_matches(model, config, params, vocab_size):
    pixels, tokens, eot = _inputs(vocab_size)
    with torch.no_grad():
        want_img = _features(model.get_image_features(
            pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())))
        want_txt = _features(model.get_text_features(input_ids=torch.from_numpy(tokens)))
    net = clip.CLIP(config)
    img, txt, scale = jax.jit(net.apply)({"params": params}, pixels, tokens.astype(np.int32),
                                        eot)
    np.testing.assert_allclose(np.asarray(img), want_img, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(txt), want_txt, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(scale), float(model.logit_scale.detach()), rtol=1e-6)
    return img, txt


VOCAB = 200


@pytest.fixture(scope="module")
def hf_model():
    return _hf_model(VOCAB)


def test_convert_hugging_face_state_dict(hf_model):
    config, params = openai_clip.convert(hf_model.state_dict())
    assert config == clip.ClipConfig(
        embed_dim=32, image_size=32, patch_size=8, vision_width=128, vision_layers=2,
        vision_heads=2, vocab_size=VOCAB, context_length=16, text_width=128, text_layers=2,
        text_heads=2)
    _check_matches(hf_model, config, params, VOCAB)


def test_convert_openai_names_through_torch_save(hf_model, tmp_path):
    sd = _hf_to_openai_names(hf_model.state_dict())
    path = tmp_path / "openai_names.pt"
    torch.save(sd, str(path))
    loaded = openai_clip.load_state_dict(str(path))
    assert set(loaded) == set(sd)
    assert all(v.dtype == np.float32 for v in loaded.values())
    config, params = openai_clip.convert(loaded)
    ref_config, ref_params = openai_clip.convert(hf_model.state_dict())
    assert config == ref_config
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive(hf_model, tmp_path):
    """OpenAI's release is a float16 TorchScript archive: load it through torch.jit."""
    sd = {k: v.half() for k, v in _hf_to_openai_names(hf_model.state_dict()).items()}
    root = _Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for name in path:
            if not hasattr(mod, name):
                mod.add_module(name, _Holder())
            mod = getattr(mod, name)
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(root), str(path))
    loaded = openai_clip.load_state_dict(str(path))
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v.float().numpy())
    config, _ = openai_clip.convert(loaded)
    assert config.vision_width == 128 and config.text_layers == 2


def test_heads_not_64_wide(tmp_path, tokenizer, merges_file):
    """32-wide heads: given explicitly, or read from a Hugging Face directory's config."""
    model = _hf_model(tokenizer.vocab_size, width=64, heads=2, seed=1)
    config, params = openai_clip.convert(model.state_dict(), vision_heads=2, text_heads=2)
    assert (config.vision_heads, config.text_heads) == (2, 2)
    _check_matches(model, config, params, tokenizer.vocab_size)
    default, _ = openai_clip.convert(model.state_dict())
    assert (default.vision_heads, default.text_heads) == (1, 1)  # OpenAI's width // 64

    folder = tmp_path / "hf_clip"
    model.save_pretrained(str(folder))
    out = openai_clip.import_clip(str(folder), merges_file, str(tmp_path / "export"))
    meta = exports.read_meta(out)
    assert meta["identity"]["model"]["vision_heads"] == 2
    assert meta["identity"]["model"]["text_heads"] == 2
    assert meta["checkpoint"] == "hf_clip"


def test_import_round_trip(tokenizer, merges_file, tmp_path):
    model = _hf_model(tokenizer.vocab_size, seed=2)
    ckpt = tmp_path / "ViT-tiny.pt"
    torch.save(_hf_to_openai_names(model.state_dict()), str(ckpt))
    out_dir = tmp_path / "export"
    out = openai_clip.import_clip(str(ckpt), merges_file, str(out_dir))
    assert out == str(out_dir)

    meta = exports.read_meta(out)
    config, ref_params = openai_clip.convert(model.state_dict())
    assert meta["source"] == "openai" and meta["checkpoint"] == "ViT-tiny.pt"
    ident = meta["identity"]
    assert ident["kind"] == "clip"
    assert ident["model"] == dataclasses.asdict(config)
    assert ident["tokenizer"] == tokenizer.identity()
    copied = out_dir / "tokenizer" / ident["tokenizer"]["file"]
    assert copied.read_bytes() == open(merges_file, "rb").read()
    params, _ = exports.load(out)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)

    # The scorer reads the export back and scores with the right embeddings.
    from dalle_jax.rerank import scorer

    clip_scorer = scorer.ClipScorer.load(out)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    captions = ["a photo of a cat", "two dogs in the snow"]
    tokens, eot, _ = tokenizer.encode_batch(captions, context_length=16)
    with torch.no_grad():
        pixels = clip.preprocess(images, config).transpose(0, 3, 1, 2).copy()
        want_img = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
        want_txt = _features(model.get_text_features(
            input_ids=torch.from_numpy(tokens.astype(np.int64))))
    want_img /= np.linalg.norm(want_img, axis=-1, keepdims=True)
    want_txt /= np.linalg.norm(want_txt, axis=-1, keepdims=True)
    np.testing.assert_allclose(clip_scorer.embed_images(images), want_img, atol=1e-5)
    np.testing.assert_allclose(clip_scorer.embed_captions(captions), want_txt, atol=1e-5)

    # --job=evaluate takes an imported scorer too: the `shapes` retrieval evaluator of
    # configs/clip_shapes.py, with the export's own towers and tokenizer.
    import os

    from dalle_jax import configlib
    from dalle_jax.data import sources
    from dalle_jax.evals import job as eval_job

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = configlib.load_config(os.path.join(root, "configs", "clip_shapes.py"))
    cfg.data.data_dir = str(tmp_path / "data")
    cfg.data.shapes.update(image_size=16, num_train=16, num_validation=8, num_test=8)
    cfg.data.image_size = 16
    cfg.evals.clip.update(num_examples=8, negatives=2, batch_size=8)
    cfg.evaluate.update(params=out, out_dir=str(tmp_path / "evaluation"))
    sources.prepare(cfg.data)
    record = eval_job.run(cfg, str(tmp_path / "run"))
    assert record["kind"] == "scorer" and record["export"] == str(out_dir)
    for split in ("validation", "test_compositional"):
        assert record["metrics"][f"{split}/num_examples"] == 8
        for k in ("retrieval_top1", "hard_negative_accuracy"):
            assert 0.0 <= record["metrics"][f"{split}/{k}"] <= 1.0

    with pytest.raises(FileExistsError, match="not empty"):
        openai_clip.import_clip(str(ckpt), merges_file, str(out_dir))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        openai_clip.import_clip(str(tmp_path / "missing.pt"), merges_file, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        openai_clip.import_clip(str(ckpt), str(tmp_path / "missing.txt.gz"),
                                str(tmp_path / "x"))
    few = tmp_path / "few.txt"
    few.write_text("#version: 0.2\n" + "".join(open(merges_file).readlines()[1:11]))
    with pytest.raises(ValueError, match="do not belong together"):
        openai_clip.import_clip(str(ckpt), str(few), str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


def test_checkpoints_that_do_not_fit(hf_model, tmp_path):
    sd = {k: v.numpy() for k, v in _hf_to_openai_names(hf_model.state_dict()).items()}
    resnet = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    resnet.update({"visual.conv1.weight": np.zeros((32, 3, 3, 3), np.float32),
                   "visual.layer1.0.conv1.weight": np.zeros((32, 32, 1, 1), np.float32),
                   "visual.attnpool.positional_embedding": np.zeros((50, 64), np.float32)})
    with pytest.raises(ValueError, match="only ViT CLIP models are supported"):
        openai_clip.convert(resnet)

    missing = dict(sd)
    del missing["transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing keys: transformer\.resblocks\.1\.mlp\.c_fc"):
        openai_clip.convert(missing)
    extra = dict(sd, **{"visual.extra_thing": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: visual\.extra_thing"):
        openai_clip.convert(extra)
    wrong = dict(sd, **{"visual.ln_post.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatches: visual\.ln_post\.bias \(7,\)"):
        openai_clip.convert(wrong)
    hf_extra = dict(hf_model.state_dict(), **{"text_model.pooler.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected keys in the Hugging Face .*pooler"):
        openai_clip.convert(hf_extra)

    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        openai_clip.load_state_dict(str(tmp_path / "nothing.pt"))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        openai_clip.load_state_dict(str(tmp_path))
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], str(not_dict))
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        openai_clip.load_state_dict(str(not_dict))
