"""An offline tokenizer for synthetic checkpoints: a BPE trained in code.

No files and no network: ``write_tokenizer`` trains a small BPE on a short
built-in text and writes ``tokenizer.json`` and ``tokenizer_config.json`` (with
a ChatML chat template) that ``mlx_lm.utils.load_tokenizer`` loads, its ids
covering exactly the model's vocab.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Union

__all__ = ["write_tokenizer"]

_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_EOS_TOKEN = "<|endoftext|>"
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Short built-in text to train the offline tokenizer on.
_CORPUS = """\
hello world. the quick brown fox jumps over the lazy dog.
a mixture of experts model routes every token to a few experts out of many.
each expert is a small feed forward network; a router picks the top experts
and mixes their outputs with the router weights. expert parallel inference
places different experts on different machines and sends the tokens to them.
message passing moves the hidden states between the ranks, then the results
are gathered and summed. the attention layers stay the same on every rank.
numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and symbols , . ; : ! ? ( ) [ ] { }
once upon a time there was a small model with random weights that wrote
random words, and everyone was happy because the tests passed on the first try.
"""

def _corpus_lines() -> Iterable[str]:
    """The built-in training text, plus a few variants for more merges."""
    lines = [line for line in _CORPUS.splitlines() if line]
    yield from lines
    yield from (line.upper() for line in lines)
    yield from (line.title() for line in lines)


def _train_tokenizer(vocab_size: int):
    """Trains a small BPE tokenizer in code (no files, no network).

    Byte-level BPE (any text encodes) when the vocab has room for the 256
    byte tokens; otherwise a character-level BPE with an ``<unk>`` token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(_SPECIAL_TOKENS)
    byte_level = vocab_size >= 256 + len(specials)
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        specials.append("<unk>")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    # A character-level vocab must leave room for the specials.
    limit = {} if byte_level else {"limit_alphabet": max(vocab_size - len(specials), 1)}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
        **limit,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    return tok, byte_level


def _pad_vocab(tokenizer_json: Dict[str, Any], vocab_size: int) -> None:
    """Fills unused ids with ``<extra_i>`` vocab entries.

    Random models emit every id below ``vocab_size``; giving each one a
    token keeps decoding well defined. ASCII names decode to themselves in
    the byte-level decoder.
    """
    vocab = tokenizer_json["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in tokenizer_json["added_tokens"]}
    for i in range(vocab_size):
        if i not in used:
            vocab[f"<extra_{i}>"] = i


def write_tokenizer(path: Union[str, Path], vocab_size: int) -> int:
    """Writes an offline ``tokenizer.json`` + ``tokenizer_config.json``.

    The tokenizer is a BPE trained in code on a short built-in text; ids run
    over exactly ``[0, vocab_size)``. ``mlx_lm.utils.load_tokenizer(path)``
    loads it; its config has a ChatML ``chat_template``.

    Args:
        path: Output directory (created).
        vocab_size: The model's vocab size; every token id is below it.

    Returns:
        The eos token id.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, byte_level = _train_tokenizer(vocab_size)
    tokenizer_json = json.loads(tok.to_str())
    _pad_vocab(tokenizer_json, vocab_size)
    with open(path / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_json, f, ensure_ascii=False)
    eos_id = tok.token_to_id(_EOS_TOKEN)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": _EOS_TOKEN,
        "pad_token": _EOS_TOKEN,
        "bos_token": None,
        "unk_token": None if byte_level else "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": _CHAT_TEMPLATE,
    }
    with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    with open(path / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump({"eos_token": _EOS_TOKEN, "pad_token": _EOS_TOKEN}, f, indent=2)
    return eos_id
