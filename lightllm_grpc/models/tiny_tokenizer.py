"""A byte-level BPE tokenizer trained locally on a built-in corpus (no downloads).

Used by the embedded default model and by tests: deterministic, any vocabulary size,
a BOS/EOS pair and a chat template, so every server feature works without a checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = tuple(
    (
        "the a of to and in is it you that he was for on are with as his they be at one have this from or "
        "had by hot word but what some we can out other were all there when up use your how said an each "
        "she which do their time if will way about many then them write would like so these her long make "
        "thing see him two has look more day could go come did number sound no most people my over know "
        "water than call first who may down side been now find any new work part take get place made live "
        "where after back little only round man year came show every good me give our under name very "
        "through just form sentence great think say help low line differ turn cause much mean before move "
        "right boy old too same tell does set three want air well also play small end put home read hand "
        "port large spell add even land here must big high such follow act why ask men change went light "
        "kind off need house picture try us again animal point mother world near build self earth father "
        "head stand own page should country found answer school grow study still learn plant cover food "
        "sun four between state keep eye never last let thought city tree cross farm hard start might "
        "story saw far sea draw left late run while press close night real life few north open seem "
        "together next white children begin got walk example ease paper group always music those both "
        "mark often letter until mile river car feet care second book carry took science eat room friend "
        "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough "
        "plain girl usual young ready above ever red list though feel talk bird soon body dog family "
        "direct pose leave song measure door product black short numeral class wind question happen "
        "complete ship area half rock order fire south problem piece told knew pass since top whole king "
        "space Hello hello world World Café naïve 東京 привет 🙂 … — 42 3.14 2026 , . ! ? ; : ' \" ( ) [ ] { "
        "} + - * / = def return import class self print if else for while True False None "
    ).split()
)


def _corpus(lines: int = 4000) -> list[str]:
    # Deterministic pseudo-sentences: a linear congruential walk over the word list.
    out, state = [], 12345
    for _ in range(lines):
        words = []
        for _ in range(8 + state % 9):
            state = (state * 1103515245 + 12345) % (1 << 31)
            words.append(_WORDS[state % len(_WORDS)])
        out.append(" ".join(words) + ".")
    out.extend(" ".join(p) for p in itertools.permutations(_WORDS[:8], 3))
    return out


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with exactly ``vocab_size`` ids (padded with reserved tokens)."""
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet plus special tokens")
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(vocab_size)
    tok.save_pretrained(str(out_dir))
    return tok
