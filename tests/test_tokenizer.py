import base64

import pytest

from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, get_tokenizer

TEXTS = ["Hello, world!", "  leading spaces and\nnew lines\n", "Ünïcödé — 東京 🙂", "def f(x):\n    return x ** 2"]


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_tokenizer_round_trips(llama2_tokenizer_path, text):
    tok = get_tokenizer(llama2_tokenizer_path)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id() == 1
    assert tok.decode(ids[1:]) == text


def test_llama2_tokenizer_is_sentencepiece_with_known_ids(llama2_tokenizer_path):
    tok = get_tokenizer(llama2_tokenizer_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 32000 and tok.stop_ids() == [2]
    assert tok.encode("Hello", bos=False) == [15043]  # "▁Hello" in the Llama 2 vocabulary
    assert tok.decode(tok.encode_chat("hi")) == "[INST] hi [/INST]"


@pytest.fixture
def tiktoken_file(tmp_path):
    """A small tiktoken BPE file: the 256 bytes plus a few merges, in the Llama 3 file format."""
    ranks = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"llo", b"hello", b" w"]
    path = tmp_path / "renamed.bin"  # the name says nothing; the contents decide
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


def test_tiktoken_file_detected_from_contents(tiktoken_file):
    tok = get_tokenizer(tiktoken_file)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == 261 + 256
    assert tok.encode("hello", bos=False) == [259]  # merged into one token


def test_tiktoken_round_trip_and_llama3_chat_template(tiktoken_file):
    tok = get_tokenizer(tiktoken_file)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, bos=False)) == text
    ids = tok.encode_chat("hello")
    assert ids[0] == tok.bos_id() == 261  # <|begin_of_text|> follows the BPE ranks
    start_header, end_header, eot = 261 + 6, 261 + 7, 261 + 9
    assert ids[1] == start_header and end_header in ids and eot in ids
    assert tok.decode(ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert eot in tok.stop_ids() and tok.end_of_turn() == [eot]
    assert tok.encode_chat("hello", first_turn=False) == ids[1:]  # later turns do not repeat <|begin_of_text|>


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01 not a tokenizer at all")
    with pytest.raises(ValueError, match="neither a SentencePiece nor a tiktoken model"):
        get_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        get_tokenizer(tmp_path / "missing.model")
