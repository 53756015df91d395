"""A synthetic retrieval task, and the small model trained on it, for measuring the fidelity
of approximate KV reuse (CacheBlend-style blending of documents' KV anywhere in a prompt).

A prompt is a system preamble, four documents and a question, joined by the separator
``" # # "`` (LMCache's default blend separator)::

    SYSTEM # # doc1 # # doc2 # # doc3 # # doc4 # # what is KEY ?

A document is a title, 12-22 facts and 0-2 aliases, 50-98 tokens, in the built-in
invented words of :mod:`lmcache_sgl.models`::

    spleal : broont is thuck . vaip is cleest . grelm is broont . ...

A fact ``K is V`` gives key K the value V; an alias ``K2 is K1`` (its object is a key
word, not a value word) gives K2 the value of K1, as stated in an EARLIER document. The
answer is ONE token, a value, followed by ``</s>``. A question is of type

* ``"single"``: the key is stated in exactly one of the four documents;
* ``"updated"``: the key is stated in two or more documents with another value in the last
  one; the right answer is the value in the document that comes LAST in the prompt, so it
  depends on the documents' order (a lookup that prefers the latest position finds it);
* ``"alias"``: the key is stated once, by an alias, and its target once, by a fact, in an
  earlier document: the answer is the target's value, two hops away. Which target an
  alias resolves to depends on the documents before it, so a document's own KV, computed
  without them, cannot hold the answer. Aliases whose target is not stated earlier (most
  of them in a prompt of pool documents) are never asked.

Contracts:

* The tokenizer is word level with whitespace pre-tokenization: ``token_ids(a + " " + b)
  == token_ids(a) + token_ids(b)``, and ``token_ids(SEPARATOR) == SEPARATOR_IDS`` appears
  verbatim in a prompt's ids at every separator. :func:`token_ids` is a pure-Python
  equivalent of the saved tokenizer (``AutoTokenizer.from_pretrained(MODEL_DIR)``), which
  adds ``<s>`` in front of a text.
* Everything is a pure function of its arguments: the vocabulary, every document pool and
  every prompt list are the same on every call, machine and Python version (string-seeded
  :class:`random.Random`). Splits ``train``, ``valid`` and ``test`` draw from seeds of their
  own; the model was trained on ``train`` only (fresh documents every sequence), stopped
  on ``valid``, and is measured on ``test``.
* :data:`MODEL_DIR` is a Hugging Face LlamaForCausalLM directory (bf16) that SGLang
  serves; ``scripts/train_retrieval.py`` rebuilds it from scratch.

    p = sample_prompts(50, "test")[0]
    p.input_ids, p.doc_spans, p.qtype, p.answer_id   # feed input_ids, expect answer_id
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import _word

MODEL_DIR = Path(__file__).resolve().parent / "data" / "retrieval"

SEPARATOR = " # # "
N_DOCS = 4
MIN_FACTS, MAX_FACTS = 12, 22  # per document: 2 + 4 * (facts + aliases) = 50..98 tokens
MAX_ALIASES = 2
QTYPES = ("single", "updated", "alias")
SPLITS = ("train", "valid", "test")
POOL_SIZE = 64  # documents per split's pool (test and valid prompts draw 4 of them)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
STRUCTURE = ["#", ".", ":", "?", "is", "what"]
N_PREAMBLE, N_TITLES, N_KEYS, N_VALUES = 8, 32, 200, 100


def _invented_words() -> tuple[list[str], list[str], list[str], list[str]]:
    rng = random.Random("lmcache-sgl-retrieval-words")
    seen = set(SPECIAL_TOKENS) | set(STRUCTURE)
    words: list[str] = []
    while len(words) < N_PREAMBLE + N_TITLES + N_KEYS + N_VALUES:
        w = _word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    a, b, c = N_PREAMBLE, N_PREAMBLE + N_TITLES, N_PREAMBLE + N_TITLES + N_KEYS
    return words[:a], words[a:b], words[b:c], words[c:]


PREAMBLE_WORDS, TITLES, KEYS, VALUES = _invented_words()
#: The system preamble (9 tokens; the prompt's ids put ``<s>`` before it).
SYSTEM = " ".join(PREAMBLE_WORDS) + " :"
VOCAB: list[str] = SPECIAL_TOKENS + STRUCTURE + PREAMBLE_WORDS + TITLES + KEYS + VALUES
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = (TOKEN_ID[t] for t in SPECIAL_TOKENS)
VALUE_IDS = frozenset(TOKEN_ID[v] for v in VALUES)
KEY_IDS = frozenset(TOKEN_ID[k] for k in KEYS)
_KEY_SET = frozenset(KEYS)


def token_ids(text: str) -> list[int]:
    """Word-level ids of ``text`` without ``<s>``; equal to the saved tokenizer's
    ``encode(text, add_special_tokens=False)``. Unknown words are ``<unk>``."""
    return [TOKEN_ID.get(w, UNK_ID) for w in text.split()]


SEPARATOR_IDS = tuple(token_ids(SEPARATOR))


def build_tokenizer() -> Any:
    """The task's tokenizer as a transformers PreTrainedTokenizerFast (WordLevel over
    :data:`VOCAB`, whitespace split, ``<s>`` prepended, tokens joined by spaces on decode)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=1 << 20
    )


def load_tokenizer(path: str | Path = MODEL_DIR) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------- documents


@dataclass(frozen=True)
class Document:
    """A title and facts (key, object): the object is a value, or a key for an alias;
    keys (subjects) are distinct within a document, and no alias's target is one."""

    title: str
    facts: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return f"{self.title} : " + " ".join(f"{k} is {v} ." for k, v in self.facts)

    @property
    def ids(self) -> list[int]:
        return token_ids(self.text)

    def value(self, key: str) -> str | None:
        """The object stated for ``key``: a value, or (an alias) the target key."""
        return next((v for k, v in self.facts if k == key), None)


def is_alias(obj: str) -> bool:
    """Whether a fact's object is a key (the fact is an alias) rather than a value."""
    return obj in _KEY_SET


def make_document(
    rng: random.Random, facts: tuple[int, int] = (MIN_FACTS, MAX_FACTS), aliases: tuple[int, int] = (0, MAX_ALIASES)
) -> Document:
    """One document drawn from ``rng``: a title, 12-22 facts (or ``facts``' range) on
    distinct keys (of 200), each with a value (of 100, drawn with replacement), and 0-2
    aliases (or ``aliases``' range) on further keys, each naming a target key that the
    document does not state, inserted at random places among the facts."""
    n, m = rng.randint(*facts), rng.randint(*aliases)
    keys = rng.sample(KEYS, n + m)
    out = [(k, rng.choice(VALUES)) for k in keys[:n]]
    others = [k for k in KEYS if k not in keys]
    for k in keys[n:]:
        out.insert(rng.randint(0, len(out)), (k, rng.choice(others)))
    return Document(rng.choice(TITLES), tuple(out))


def _rng(split: str, what: str, seed: int = 0) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    return random.Random(f"lmcache-sgl-retrieval-{split}-{what}-{seed}")


def document_pool(split: str = "test", size: int = POOL_SIZE) -> list[Document]:
    """The split's documents; a smaller ``size`` is a prefix of a larger one."""
    rng = _rng(split, "pool")
    return [make_document(rng) for _ in range(size)]


def classify(documents: Sequence[Document], key: str) -> str | None:
    """The question type of ``key`` over ``documents`` in prompt order: ``"single"``,
    ``"updated"`` (stated more than once, the last value differs from every earlier one),
    ``"alias"`` (stated once, by an alias whose target is stated once, by a fact, in an
    earlier document), or None (not stated, restated with a value it had before, or
    stated by an alias otherwise: ambiguous)."""
    stated = [(i, v) for i, v in ((i, d.value(key)) for i, d in enumerate(documents)) if v is not None]
    if not stated:
        return None
    values = [v for _, v in stated]
    if any(map(is_alias, values)):
        if len(stated) != 1:
            return None
        ((at, target),) = stated
        where = [i for i, d in enumerate(documents) if d.value(target) is not None]
        ok = len(where) == 1 and where[0] < at and not is_alias(documents[where[0]].value(target) or "")
        return "alias" if ok else None
    if len(values) == 1:
        return "single"
    return "updated" if values[-1] not in values[:-1] else None


def answer(documents: Sequence[Document], key: str) -> str:
    """The value of ``key`` stated last in ``documents``; an alias's is its target's
    value in the documents before the alias's (KeyError if none states it)."""
    for i in reversed(range(len(documents))):
        v = documents[i].value(key)
        if v is not None:
            return answer(documents[:i], v) if is_alias(v) else v
    raise KeyError(key)


def keys_by_type(documents: Sequence[Document]) -> dict[str, list[str]]:
    """Every askable key of ``documents``, by question type, in first-statement order."""
    out: dict[str, list[str]] = {t: [] for t in QTYPES}
    seen: set[str] = set()
    for d in documents:
        for k, _ in d.facts:
            if k not in seen:
                seen.add(k)
                t = classify(documents, k)
                if t is not None:
                    out[t].append(k)
    return out


# ---------------------------------------------------------------- prompts


def question_text(key: str) -> str:
    return f"what is {key} ?"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt. ``text == SEPARATOR.join(parts)`` with ``parts = (SYSTEM,
    doc1, .., doc4, question)``; ``input_ids == [BOS_ID] + token_ids(text)``;
    ``doc_spans[i] = (start, end)``: ``input_ids[start:end] == documents[i].ids``, and the
    separator ids sit right before each span and right after the last. The model should
    generate ``answer_id`` and then ``EOS_ID``."""

    text: str
    parts: tuple[str, ...]
    input_ids: tuple[int, ...]
    doc_spans: tuple[tuple[int, int], ...]
    documents: tuple[Document, ...]
    key: str
    qtype: str
    answer: str
    answer_id: int
    key_docs: tuple[int, ...]  # indices (prompt order) of the documents stating the key (or an alias's target)


def _layout(documents: Sequence[Document]) -> tuple[list[int], list[tuple[int, int]]]:
    """ids of ``<s> SYSTEM # # doc1 # # .. docN # #`` and the documents' spans."""
    ids = [BOS_ID, *token_ids(SYSTEM)]
    spans = []
    for d in documents:
        ids += SEPARATOR_IDS
        spans.append((len(ids), len(ids) + len(d.ids)))
        ids += d.ids
    ids += SEPARATOR_IDS
    return ids, spans


def build_prompt(documents: Sequence[Document], key: str) -> Prompt:
    """The prompt asking ``key`` over ``documents`` (in this order). ValueError if the key
    is not askable there (see :func:`classify`)."""
    documents = tuple(documents)
    qtype = classify(documents, key)
    if qtype is None:
        raise ValueError(f"key {key!r} is not stated, or not unambiguously, in the documents")
    question = question_text(key)
    target = next(v for v in (d.value(key) for d in documents) if v is not None) if qtype == "alias" else key
    parts = (SYSTEM, *(d.text for d in documents), question)
    ids, spans = _layout(documents)
    value = answer(documents, key)
    return Prompt(
        text=SEPARATOR.join(parts),
        parts=parts,
        input_ids=tuple(ids + token_ids(question)),
        doc_spans=tuple(spans),
        documents=documents,
        key=key,
        qtype=qtype,
        answer=value,
        answer_id=TOKEN_ID[value],
        key_docs=tuple(i for i, d in enumerate(documents) if d.value(key) is not None or d.value(target) is not None),
    )


def sample_prompts(
    n: int, split: str = "test", qtype: str | None = None, pool_size: int = POOL_SIZE, seed: int = 0
) -> list[Prompt]:
    """``n`` prompts over the split's :func:`document_pool`: each takes 4 distinct
    documents in a random order and asks one key; types alternate single, updated, alias,
    .. unless ``qtype`` fixes one. Deterministic in (n, split, qtype, pool_size, seed), and
    the first k of n prompts are the k prompts of the same call with n = k."""
    if qtype is not None and qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}; choose from {QTYPES}")
    pool = document_pool(split, pool_size)
    rng = _rng(split, f"prompts-{qtype}-{pool_size}", seed)
    out = []
    for i in range(n):
        want = qtype or QTYPES[i % len(QTYPES)]
        while True:
            docs = rng.sample(pool, N_DOCS)
            keys = keys_by_type(docs)[want]
            if keys:
                break
        out.append(build_prompt(docs, rng.choice(keys)))
    return out


def training_sequence(
    rng: random.Random, n_questions: int = 16, facts: tuple[int, int] = (MIN_FACTS, MAX_FACTS), link: float = 0.8
) -> tuple[list[int], list[int]]:
    """One training sequence and its labels: 4 fresh documents (of ``facts`` facts and 0-2
    aliases; each alias after the first document retargeted with probability ``link`` to
    a key stated in an earlier one), then up to ``n_questions`` questions, each followed
    by its answer and ``</s>`` (``... # # what is K ? V </s> what is K2 ? V2 </s> ..``),
    up to a third of them of type alias and a third updated where the documents have
    enough, the rest single. ``labels[i]`` is the token at i where it is an answer or its
    ``</s>``, else -100."""
    docs = [make_document(rng, facts) for _ in range(N_DOCS)]
    for i in range(1, N_DOCS):
        earlier = [k for d in docs[:i] for k, v in d.facts if not is_alias(v)]
        own = {k for k, _ in docs[i].facts}
        choices = [k for k in earlier if k not in own]
        relinked = [
            (k, rng.choice(choices)) if is_alias(v) and choices and rng.random() < link else (k, v)
            for k, v in docs[i].facts
        ]
        docs[i] = Document(docs[i].title, tuple(relinked))
    ids, _ = _layout(docs)
    labels = [-100] * len(ids)
    by_type = keys_by_type(docs)
    alias = rng.sample(by_type["alias"], min(len(by_type["alias"]), n_questions // 3))
    updated = rng.sample(by_type["updated"], min(len(by_type["updated"]), n_questions // 3))
    single = rng.sample(by_type["single"], min(len(by_type["single"]), n_questions - len(updated) - len(alias)))
    keys = alias + updated + single
    rng.shuffle(keys)
    for k in keys:
        q = token_ids(question_text(k))
        ids += q + [TOKEN_ID[answer(docs, k)], EOS_ID]
        labels += [-100] * len(q) + ids[-2:]
    return ids, labels


# ---------------------------------------------------------------- scoring


def predict(model: Any, prompts: Sequence[Prompt], batch_size: int = 50) -> list[int]:
    """Greedy next token after each prompt with full prefill: a plain forward of a
    transformers causal LM (on its device and dtype), prompts right-padded per batch."""
    import torch

    device = next(model.parameters()).device
    out: list[int] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = [p.input_ids for p in prompts[i : i + batch_size]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = torch.tensor([len(s) - 1 for s in batch], device=device)
            out += logits[torch.arange(len(batch), device=device), last].argmax(-1).tolist()
    return out


def accuracy(prompts: Sequence[Prompt], predictions: Sequence[int]) -> dict[str, float]:
    """Fraction of right answers per question type present, and ``"all"``."""
    if len(prompts) != len(predictions):
        raise ValueError("one prediction per prompt")
    out = {}
    for t in (*QTYPES, "all"):
        hits = [p.answer_id == a for p, a in zip(prompts, predictions, strict=True) if t in ("all", p.qtype)]
        if hits:
            out[t] = sum(hits) / len(hits)
    return out
