import base64
import json

import pytest
from conftest import HF_TEXTS

from tokenizer import HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, find_tokenizer, get_tokenizer

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


# ---------------------------------------------------------------- Hugging Face tokenizer.json


@pytest.mark.parametrize("text", HF_TEXTS)
def test_tokenizer_json_encodes_and_decodes_as_transformers(hf_tokenizer_folder, text):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_folder)
    tok = get_tokenizer(find_tokenizer(hf_tokenizer_folder))
    assert isinstance(tok, HFTokenizer) and tok.bos_id() == 0 and tok.stop_ids() == [1, 2]
    ids = tok.encode(text)
    assert ids == ref.encode(text) and ids[0] == 0
    assert tok.encode(text, bos=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text


def test_a_stream_of_byte_level_pieces_never_shows_a_broken_character(hf_tokenizer_folder, capsys):
    import torch

    from generate import TextStream

    tok = get_tokenizer(hf_tokenizer_folder / "tokenizer.json")
    text = "東京 🙂 café"
    stream = TextStream(tok)
    for i in tok.encode(text, bos=False):  # pieces that split multi-byte characters
        stream(torch.tensor([[i]]))
    assert stream.finish() == text and capsys.readouterr().out == text


def test_the_folder_decides_which_tokenizer_file(hf_tokenizer_folder, tmp_path):
    assert find_tokenizer(hf_tokenizer_folder).name == "tokenizer.json"
    (hf_tokenizer_folder / "tokenizer.model").write_bytes(b"")  # a tokenizer.model, where there is one, comes first
    assert find_tokenizer(hf_tokenizer_folder).name == "tokenizer.model"


def converted_random_llama(folder, out_dir):
    """A random Llama (vocabulary 512) saved as HF weights into the tokenizer's folder, converted to out_dir."""
    import torch
    import transformers
    from convert_hf_checkpoint import convert_hf_checkpoint

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    generation = (folder / "generation_config.json").read_text()
    transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=512, **shape)).save_pretrained(folder)
    (folder / "generation_config.json").write_text(generation)  # save_pretrained writes one of its own
    return convert_hf_checkpoint(folder, out_dir=out_dir)


def test_a_model_with_only_tokenizer_json_converts_and_generates(hf_tokenizer_folder, tmp_path, capsys):
    """The folder of a Llama-architecture model that ships tokenizer.json and no tokenizer.model."""
    from convert_hf_checkpoint import TOKENIZER_FILES

    import generate

    out = converted_random_llama(hf_tokenizer_folder, tmp_path / "converted")
    assert {f for f in TOKENIZER_FILES[:3]} <= {p.name for p in out.parent.iterdir()}
    generate.main(["--checkpoint_path", str(out), "--prompt", "Hello, world!", "--max_new_tokens", "5"]
                  + ["--num_samples", "1", "--device", "cpu", "--temperature", "0"])  # fmt: skip
    assert "\nHello, world!" in capsys.readouterr().out


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<eot>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<eot>' }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<eot>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DIALOG = [
    {"role": "system", "content": "Answer briefly, in English — or en français."},
    {"role": "user", "content": "Hello, world! 🙂"},
    {"role": "assistant", "content": "Bonjour. Ünïcödé 東京"},
    {"role": "user", "content": "  def f(x):\n    return x ** 2  "},
]


@pytest.mark.parametrize("template", [CHATML, LLAMA3_LIKE], ids=["chatml", "llama3-like"])
@pytest.mark.parametrize("turns", [DIALOG[1:2], DIALOG[:2], DIALOG])
def test_the_models_chat_template_renders_as_transformers(hf_tokenizer_folder, template, turns):
    import transformers

    config = json.loads((hf_tokenizer_folder / "tokenizer_config.json").read_text())
    (hf_tokenizer_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ref = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_folder)
    text = ref.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert get_tokenizer(hf_tokenizer_folder / "tokenizer.json").encode_dialog(turns) == ref.encode(
        text, add_special_tokens=False
    )


def test_a_template_that_refuses_is_a_clear_error(hf_tokenizer_folder):
    refuse = "{{ raise_exception('roles must alternate') }}"
    config = json.loads((hf_tokenizer_folder / "tokenizer_config.json").read_text())
    (hf_tokenizer_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": refuse}))
    with pytest.raises(ValueError, match="the chat template refused the conversation: roles must alternate"):
        get_tokenizer(hf_tokenizer_folder / "tokenizer.json").encode_dialog(DIALOG[1:2])


def test_the_chat_renders_each_turn_with_the_template_and_stops_at_its_end_of_turn(
    hf_tokenizer_folder, tmp_path, capsys, monkeypatch
):

    import generate

    config = json.loads((hf_tokenizer_folder / "tokenizer_config.json").read_text())
    (hf_tokenizer_folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    out = converted_random_llama(hf_tokenizer_folder, tmp_path / "converted")
    answers, prompts, real = iter(["Hello, world!", "And then?"]), [], generate.run_sample

    def ask(_):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    def recording(model, prompt, args, steps, stop_ids, *rest, **kw):
        prompts.append((prompt.tolist(), stop_ids))
        return real(model, prompt, args, steps, stop_ids, *rest, **kw)

    monkeypatch.setattr("builtins.input", ask)
    monkeypatch.setattr(generate, "run_sample", recording)
    generate.main(["--checkpoint_path", str(out), "--interactive", "--system", "Be brief.", "--max_new_tokens", "8"]
                  + ["--device", "cpu", "--temperature", "0"])  # fmt: skip
    tok = get_tokenizer(out.parent / "tokenizer.json")
    first = tok.encode_dialog(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    )
    assert prompts[0] == (first, [1, 2])  # the template's rendering; the reply stops at the end-of-turn ids
    assert prompts[1][0][: len(first)] == first and len(prompts[1][0]) > len(first)  # the second turn extends it
