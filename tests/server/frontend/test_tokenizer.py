"""Tokenizers: byte-level fallback, a tokenizer.json built with the `tokenizers` library,
and streaming deltas that never split a UTF-8 character."""

from __future__ import annotations

import pytest

from server.frontend.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDecoder, load_tokenizer

TEXT = "Grüße, naïve café — 東京 🙂 and 👩‍💻!"


def stream(tokenizer, ids, prompt_ids=()) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, prompt_ids)
    return [decoder.step(i) for i in ids] + [decoder.flush()]


def test_byte_fallback_round_trips_utf8():
    tok = load_tokenizer(None, 512)
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT


def test_byte_fallback_skips_ids_past_the_bytes():
    tok = load_tokenizer(None, 512)
    assert tok.decode([72, 300, 105, 511]) == "Hi"  # a random-init model samples ids 256..511


def test_byte_fallback_needs_256_ids():
    with pytest.raises(ValueError, match="vocab_size >= 256, got 100"):
        load_tokenizer(None, 100)


def test_folder_without_tokenizer_json_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, 512), ByteTokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing", 512)


def test_byte_stream_never_emits_partial_characters():
    tok = load_tokenizer(None, 512)
    deltas = stream(tok, tok.encode(TEXT))
    assert deltas[:4] == ["G", "r", "", "ü"]  # ü is two bytes: nothing, then the whole character
    assert [d for d in deltas if d] == list(TEXT)  # each code point once, whole, as soon as complete


def test_byte_stream_flushes_an_unfinished_character():
    tok = load_tokenizer(None, 512)
    assert stream(tok, [0x41, 0xE2, 0x82]) == ["A", "", "", "\ufffd"]  # stopped inside "€"
    assert stream(tok, [0xE2, 0x41]) == ["", "\ufffdA", ""]  # an invalid byte is shown once it is known


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A byte-level BPE trained in-test, with a BOS token, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "Grüße aus Köln", "café " * 5], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_json_loads_and_round_trips(bpe_folder):
    tok = load_tokenizer(bpe_folder, 512)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT)
    assert ids[0] == 0 and max(ids) < 300  # <s> first, then the BPE's ids
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned and used
    assert tok.decode(ids) == TEXT  # <s> skipped


def test_tokenizer_json_stream_matches_decode(bpe_folder):
    tok = load_tokenizer(bpe_folder, 512)
    prompt, completion = tok.encode("the lazy"), tok.encode(" dog 🙂 café")[1:]
    deltas = stream(tok, completion, prompt_ids=prompt)
    assert "".join(deltas) == " dog 🙂 café"
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # 🙂 spans byte-level tokens: held back until whole


def test_tokenizer_larger_than_the_model_is_refused(bpe_folder):
    with pytest.raises(ValueError, match="300 tokens, more than the model's vocab_size 256"):
        load_tokenizer(bpe_folder, 256)
