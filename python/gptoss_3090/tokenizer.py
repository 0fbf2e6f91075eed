"""A small word-level tokenizer for synthetic checkpoints (built with the `tokenizers` package).

Synthetic checkpoints have random weights, so the text they produce is meaningless; what matters
is that vLLM and transformers can load *a* tokenizer offline, encode prompts and decode outputs,
and that the eos / pad ids of ``config.json`` are real special tokens of that tokenizer.

Layout of the ids (identical words in both variants):

* ``0 .. 1013``: 990 common English words, then punctuation and the digits 0-9
  (text is NFKC-normalised and lower-cased, then split on whitespace/punctuation);
* ``<|unk|>`` at 1014 (unknown words);
* the GPT-OSS harmony special tokens (``<|startoftext|>``, ``<|endoftext|>`` = pad,
  ``<|return|>`` = eos, ``<|constrain|>``, ``<|channel|>``, ``<|start|>``, ``<|end|>``,
  ``<|message|>``, ``<|call|>``):

  - **tiny** preset: at ids 1015..1023, so the vocabulary is exactly 1,024 ids
    (:data:`TINY_VOCAB_SIZE`) and the model's embedding has no unused rows;
  - **20b** preset: at their real GPT-OSS (o200k_harmony) ids 199998..200012, so ``config.json``
    keeps the published eos 200002 / pad 199999. The model still has 201,088 embedding rows;
    ids the tokenizer does not know are simply never produced by ``encode`` and are skipped by
    ``decode`` (a random model will sample them; they decode to nothing).

Decoding joins word tokens with single spaces (word-level, no byte fallback).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "GPTOSS_SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "TINY_SPECIAL_IDS",
    "TINY_VOCAB_SIZE",
    "UNK_TOKEN",
    "build_tokenizer",
    "save_tokenizer",
    "word_tokens",
]

#: Vocabulary size of the tiny preset (= number of ids of the tiny tokenizer).
TINY_VOCAB_SIZE = 1024

#: The unknown-word token.
UNK_TOKEN = "<|unk|>"

#: GPT-OSS special tokens with their o200k_harmony ids (as in the published tokenizer).
GPTOSS_SPECIAL_IDS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

#: Names of the harmony special tokens, in id order.
SPECIAL_TOKENS: tuple[str, ...] = tuple(GPTOSS_SPECIAL_IDS)

_N_WORD_IDS = TINY_VOCAB_SIZE - 1 - len(SPECIAL_TOKENS)  # 1014: words + punctuation + digits

#: The same special tokens packed at the top of the tiny vocabulary (1015..1023).
TINY_SPECIAL_IDS: dict[str, int] = {
    name: _N_WORD_IDS + 1 + i for i, name in enumerate(SPECIAL_TOKENS)
}

_PUNCTUATION = ". , ! ? ; : ' \" ( ) - / & %".split()
_DIGITS = [str(d) for d in range(10)]

# Common English words (deduplicated, in this order); only the first ones that fit are used.
_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from
or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name
very through just form sentence great think say help low line differ turn cause much mean before
move right boy old too same tell does set three want air well also play small end put home read
hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth
father head stand own page should country found answer school grow study still learn plant cover
food sun four between state keep eye never last let thought city tree cross farm hard start
might story saw far sea draw left late run while press close night real life few north open seem
together next white children begin got walk example ease paper group always music those both
mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough
plain girl usual young ready above ever red list though feel talk bird soon body dog family
direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king
space heard best hour better true during hundred five remember step early hold west ground
interest reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map rain rule
govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note
wait plan figure star box noun field rest correct able pound done beauty drive stood contain
front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue
object decide surface deep moon island foot system busy test record boat common gold possible
plane stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow
tire bring yes distant fill east paint language among grand ball yet wave drop heart am present
heavy dance engine position arm wide sail material size vary settle speak weight general ice
matter circle pair include divide syllable felt perhaps pick sudden count square reason length
represent art subject region energy hunt probable bed brother egg ride cell believe fraction
forest sit race window store summer train sleep prove lone exercise wall catch mount wish sky
board joy winter sat written wild instrument kept glass grass cow job edge sign visit past soft
fun bright gas weather month million bear finish happy hope flower clothe strange gone jump baby
eight village meet root buy raise solve metal whether push seven paragraph third shall held hair
describe cook floor either result burn hill safe cat century consider type law bit coast copy
phrase silent tall sand soil roll temperature finger industry value fight lie beat excite
natural view sense ear else quite broke case middle kill son lake moment scale loud spring
observe child straight consonant nation dictionary milk speed method organ pay age section dress
cloud surprise quiet stone tiny climb cool design poor lot experiment bottom key iron single
stick flat twenty skin smile crease hole trade melody trip office receive row mouth exact symbol
die least trouble shout except wrote seed tone join suggest clean break lady yard rise bad blow
oil blood touch grew cent mix team wire cost lost brown wear garden equal sent choose fell fit
flow fair bank collect save control decimal gentle woman captain practice separate difficult
doctor please protect noon whose locate ring character insect caught period indicate radio spoke
atom human history effect electric expect crop modern element hit student corner party supply
bone rail imagine provide agree thus capital chair danger fruit rich thick soldier process
operate guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem
string bell depend meat rub tube famous dollar stream fear sight thin triangle planet hurry
chief colony clock mine tie enter major fresh search send yellow gun allow print dead spot
desert suit current lift rose continue block chart hat sell success company subtract event
particular deal swim term opposite wife shoe shoulder spread arrange camp invent cotton born
determine quart nine truck noise level chance gather shop stretch throw shine property column
molecule select wrong gray repeat require broad prepare salt nose plural anger claim continent
oxygen sugar death pretty skill women season solution magnet silver thank branch match suffix
especially fig afraid huge sister steel discuss forward similar guide experience score apple
bought led pitch coat mass card band rope slip win dream evening condition feed tool total basic
smell valley nor double seat arrive master track parent shore division sheet substance favor
connect post spend chord fat glad original share station dad bread charge proper bar offer
segment slave duck instant market degree populate chick dear enemy reply drink occur support
speech nature range steam motion path liquid log meant quotient teeth shell neck not into
because its government program really something almost later today yesterday tomorrow nobody
everyone someone everything anything however although instead maybe already sometimes usually
quickly slowly happily sadly computer phone email internet data model token text file image
video screen mouse code user server client network memory cache byte bytes monday tuesday
wednesday thursday friday saturday sunday january february march april june july august
september october november december zero eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen thirty forty fifty sixty seventy eighty ninety
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}"
)


def word_tokens() -> list[str]:
    """The 1,014 non-special tokens, in id order (ids 0..1013)."""
    seen: dict[str, None] = {}
    for word in _WORDS.split():
        seen.setdefault(word, None)
    extra = _PUNCTUATION + _DIGITS
    words = [w for w in seen if w not in extra][: _N_WORD_IDS - len(extra)]
    tokens = words + extra
    if len(tokens) != _N_WORD_IDS:  # pragma: no cover - guards edits of the word list
        raise RuntimeError(f"word list has {len(tokens)} tokens, expected {_N_WORD_IDS}")
    return tokens


def _check_special_ids(special_ids: Mapping[str, int]) -> None:
    missing = [name for name in SPECIAL_TOKENS if name not in special_ids]
    if missing:
        raise ValueError(f"special_ids lacks {missing}")
    ids = list(special_ids.values())
    if len(set(ids)) != len(ids) or min(ids) <= _N_WORD_IDS:
        raise ValueError(
            f"special ids must be distinct and above {_N_WORD_IDS} (the word ids and <|unk|>), "
            f"got {dict(special_ids)}"
        )


def build_tokenizer(special_ids: Mapping[str, int] = TINY_SPECIAL_IDS):
    """Builds the word-level tokenizer (a ``tokenizers.Tokenizer``).

    Args:
        special_ids: id of every harmony special token (:data:`TINY_SPECIAL_IDS` or
            :data:`GPTOSS_SPECIAL_IDS`); all must lie above the word ids and ``<|unk|>``.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    _check_special_ids(special_ids)
    vocab = {tok: i for i, tok in enumerate(word_tokens())}
    vocab[UNK_TOKEN] = _N_WORD_IDS
    vocab.update({name: special_ids[name] for name in SPECIAL_TOKENS})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(
        [AddedToken(name, special=True, normalized=False) for name in (UNK_TOKEN, *SPECIAL_TOKENS)]
    )
    return tok


def save_tokenizer(
    out_dir: str | Path,
    special_ids: Mapping[str, int] = TINY_SPECIAL_IDS,
    model_max_length: int = 131072,
) -> list[Path]:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The files load offline with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (class
    ``PreTrainedTokenizerFast``) and with vLLM. eos is ``<|return|>``, pad ``<|endoftext|>``,
    bos ``<|startoftext|>`` (not added automatically). A minimal harmony-like chat template is
    included so chat endpoints work.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(special_ids)
    tok_path = out / "tokenizer.json"
    tok.save(str(tok_path))
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "unk_token": UNK_TOKEN,
    }
    added = {
        str(tok.token_to_id(name)): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name in (UNK_TOKEN, *SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "chat_template": _CHAT_TEMPLATE,
        **specials,
    }
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    map_path = out / "special_tokens_map.json"
    map_path.write_text(json.dumps(specials, indent=2) + "\n")
    return [tok_path, cfg_path, map_path]
