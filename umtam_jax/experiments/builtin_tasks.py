"""The built-in tasks: readers of their Debian-packaged sources and their builders.

Four of the five built-in classification tasks are built here from raw Debian data
(WordNet's ``data.noun``, the King James Bible through the ``bible`` program, fortune
files); the fifth, ``py_package``, reads Python source in
:mod:`~umtam_jax.experiments.code_task`. Importing :mod:`umtam_jax.experiments.data`
imports this module, which registers all of them
(:func:`~umtam_jax.experiments.data.register_task`) with the mirror ``wn_defmatch_mirror``
(:func:`~umtam_jax.experiments.data.register_mirror_task`).

============== ====== ================================================ ===========
name           kind   labels                                           metric
============== ====== ================================================ ===========
wn_defmatch    pair   different, defines                               accuracy
kjv_section    single law, prophets, gospels_acts, epistles_revelation macro_f1
fortune_topic  single computers, politics, science, songs_poems        macro_f1
wn_supersense  single animal, plant, food, artifact, person            macro_f1
py_package     single asyncio, xml, multiprocessing, email             macro_f1
============== ====== ================================================ ===========

The label order is the integer label. ``wn_defmatch`` is balanced by construction (one
positive and one negative per synset), hence accuracy; the others have class ratios of
1.7x to 4.5x, hence macro-F1. ``py_package`` is the one task far from English prose: the
distant domain of the conflict study. The built examples are cached under the task's name
and :data:`_BUILTIN_VERSION`, so a changed builder needs that version bumped.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umtam_jax.experiments.data import (
    SPLITS,
    Examples,
    _dedupe,
    _missing,
    register_mirror_task,
    register_task,
)
from umtam_jax.experiments.splits import keyed_rng, stratified_split

__all__ = [
    "BIBLE_DIRS",
    "WORDNET_DIRS",
    "NounSynset",
    "build_fortune_topic",
    "build_kjv_section",
    "build_wn_defmatch",
    "build_wn_supersense",
    "fortune_entries",
    "kjv_verses",
    "read_noun_synsets",
    "wordnet_dir",
]

# Bump when a built-in builder changes, so stale caches are not reused.
_BUILTIN_VERSION = 2

#: Where WordNet's database is looked for (after ``$UMTAM_WORDNET_DIR``).
WORDNET_DIRS = ("/usr/share/wordnet",)


def wordnet_dir() -> Path:
    """Returns the WordNet database directory (``$UMTAM_WORDNET_DIR`` or Debian's)."""
    for c in (os.environ.get("UMTAM_WORDNET_DIR"), *WORDNET_DIRS):
        if c and (Path(c) / "data.noun").exists():
            return Path(c)
    raise _missing("WordNet data.noun", ["wordnet-base"])


@dataclasses.dataclass(frozen=True)
class NounSynset:
    """One noun synset of WordNet's ``data.noun``.

    Attributes:
        offset: Byte offset (the synset id).
        lexfile: Lexicographer file number (the supersense; 5 = noun.animal ...).
        words: Lemmas, underscores replaced by spaces.
        definition: The gloss without its quoted examples.
    """

    offset: int
    lexfile: int
    words: tuple[str, ...]
    definition: str


_EXAMPLE_RE = re.compile(r'\s*;?\s*"')


def read_noun_synsets(path: str | os.PathLike | None = None) -> list[NounSynset]:
    """Parses WordNet's ``data.noun`` (format: ``wndb(5)``).

    Args:
        path: File path (default: ``wordnet_dir() / "data.noun"``).

    Returns:
        The noun synsets in file order.
    """
    path = Path(path) if path is not None else wordnet_dir() / "data.noun"
    return list(_read_noun_synsets(str(path.resolve())))


@functools.lru_cache(maxsize=2)
def _read_noun_synsets(path: str) -> tuple[NounSynset, ...]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:
                continue  # license header
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            w_cnt = int(fields[3], 16)
            words = tuple(w.replace("_", " ") for w in fields[4 : 4 + 2 * w_cnt : 2])
            definition = _EXAMPLE_RE.split(gloss.strip(), maxsplit=1)[0].strip().rstrip(";")
            if definition:
                out.append(NounSynset(int(fields[0]), int(fields[1]), words, definition))
    return tuple(out)


# Lexicographer file numbers (lexnames(5)).
_SUPERSENSES = {"animal": 5, "plant": 20, "food": 13, "artifact": 6, "person": 18}


def build_wn_supersense(seed: int = 0) -> Examples:
    """Noun definitions labelled animal / plant / food / artifact / person.

    Args:
        seed: Unused (the data are fixed); kept for the builder signature.

    Returns:
        Deduplicated examples (definitions seen under two labels are dropped).
    """
    del seed
    lex_to_label = {lex: i for i, lex in enumerate(_SUPERSENSES.values())}
    texts, labels = [], []
    for s in read_noun_synsets():
        if s.lexfile in lex_to_label:
            texts.append(s.definition)
            labels.append(lex_to_label[s.lexfile])
    return _dedupe(texts, labels)


def build_wn_defmatch(seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict:
    """(lemma, definition) pairs: does the definition define the lemma?

    Synsets are split 80/10/10 stratified by lexicographer file (supersense); every
    synset gives a positive pair (its first lemma, its definition) and a negative pair
    (the same lemma, the definition of another synset of the same supersense and of
    the same split that does not contain the lemma). Labels are thus exactly balanced
    and no definition is shared across splits.

    Args:
        seed: Seed of the synset split and of the negative sampling.
        fractions: Train/validation/test fractions.

    Returns:
        A mapping split name -> :class:`Examples` with labels 0 (different) and 1
        (defines).
    """
    synsets = read_noun_synsets()
    # One synset per definition (a few definitions are shared verbatim).
    by_def: dict[str, NounSynset] = {}
    for s in synsets:
        by_def.setdefault(s.definition, s)
    synsets = list(by_def.values())
    lex = np.array([s.lexfile for s in synsets])
    parts = stratified_split(lex, fractions, seed)
    rng = keyed_rng(seed, "wn_defmatch")
    out = {}
    for name, idx in zip(SPLITS, parts, strict=True):
        pool: dict[int, np.ndarray] = {int(c): idx[lex[idx] == c] for c in np.unique(lex[idx])}
        texts, labels = [], []
        for i in idx:
            s = synsets[i]
            lemma = s.words[0]
            cands = pool[s.lexfile]
            neg = None
            for _ in range(20):
                t = synsets[int(cands[rng.integers(cands.size)])]
                if t is not s and lemma.lower() not in {w.lower() for w in t.words}:
                    neg = t
                    break
            if neg is None:
                continue
            pair = [((lemma, s.definition), 1), ((lemma, neg.definition), 0)]
            for text, y in pair:
                texts.append(text)
                labels.append(y)
        out[name] = Examples(texts, np.asarray(labels, dtype=np.int64))
    return out


_KJV_GROUPS = (
    (0, 5),  # law: Genesis..Deuteronomy
    (22, 39),  # prophets: Isaiah..Malachi
    (39, 44),  # gospels + acts: Matthew..Acts
    (44, 66),  # epistles + revelation: Romans..Revelation
)

#: Where ``bible.data`` is looked for (after ``$UMTAM_BIBLE_DIR``).
BIBLE_DIRS = ("/usr/lib", "/usr/share/bible-kjv")

_VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def kjv_verses(data_dir: str | os.PathLike | None = None) -> list[tuple[int, str, str]]:
    """Dumps the King James Bible with Debian's ``bible`` program.

    Runs ``bible -f -p <dir> gen1:1-rev22:21`` (``-f`` turns pretty-printing off: one
    verse per line, prefixed by its reference).

    Args:
        data_dir: Directory holding ``bible.data`` (default: ``$UMTAM_BIBLE_DIR`` or
            ``/usr/lib``, where ``bible-kjv-text`` puts it).

    Returns:
        ``(book_index, reference, text)`` for all 31,102 verses, ``book_index`` being
        0 (Genesis) .. 65 (Revelation).
    """
    exe = shutil.which("bible")
    if exe is None:
        raise _missing("The `bible` program", ["bible-kjv", "bible-kjv-text"])
    dirs = [data_dir, os.environ.get("UMTAM_BIBLE_DIR"), *BIBLE_DIRS]
    found = next((Path(d) for d in dirs if d and (Path(d) / "bible.data").exists()), None)
    if found is None:
        raise _missing("The KJV text (bible.data)", ["bible-kjv-text"])
    res = subprocess.run(
        [exe, "-f", "-p", str(found), "gen1:1-rev22:21"],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    books: dict[str, int] = {}
    out = []
    for line in res.stdout.splitlines():
        m = _VERSE_RE.match(line.strip())
        if not m:
            continue
        book = m.group(1)
        b = books.setdefault(book, len(books))
        out.append((b, f"{book}{m.group(2)}:{m.group(3)}", m.group(4).strip()))
    if len(books) != 66:
        raise RuntimeError(f"expected 66 books from `bible`, parsed {len(books)}")
    return out


def build_kjv_section(seed: int = 0) -> Examples:
    """KJV verses labelled law / prophets / gospels_acts / epistles_revelation.

    Law = Genesis-Deuteronomy, prophets = Isaiah-Malachi, gospels_acts =
    Matthew-Acts, epistles_revelation = Romans-Revelation; the historical and wisdom
    books (Joshua-Song of Solomon) are left out. Repeated verses are deduplicated.

    Args:
        seed: Unused (the data are fixed).

    Returns:
        The examples.
    """
    del seed
    texts, labels = [], []
    for book, _, text in kjv_verses():
        for label, (lo, hi) in enumerate(_KJV_GROUPS):
            if lo <= book < hi:
                texts.append(text)
                labels.append(label)
    return _dedupe(texts, labels)


_FORTUNE_FILES = ("computers", "politics", "science", "songs-poems")


def _strip_overstrike(text: str) -> str:
    """Applies backspaces ("___\\b\\b\\bfoo" -> "foo", "_\\bI" -> "I")."""
    if "\b" not in text:
        return text
    out: list[str] = []
    for ch in text:
        if ch == "\b":
            if out and out[-1] != "\n":
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def fortune_entries(name: str, fortune_dir: str | os.PathLike | None = None) -> list[str]:
    """Reads the entries of one fortune file (separated by lines holding ``%``).

    Args:
        name: File name, e.g. ``"computers"``.
        fortune_dir: Directory (default: ``$UMTAM_FORTUNE_DIR`` or
            ``/usr/share/games/fortunes``).

    Returns:
        The non-empty entries, with overstriking (``x\\bx``) removed.
    """
    d = Path(fortune_dir or os.environ.get("UMTAM_FORTUNE_DIR") or "/usr/share/games/fortunes")
    path = d / name
    if not path.exists():
        raise _missing(f"The fortune file {path}", ["fortunes", "fortunes-min"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = _strip_overstrike(text.replace("\r\n", "\n"))
    entries = re.split(r"\n%\n", "\n" + text + "\n")
    return [e.strip() for e in entries if e.strip() and e.strip() != "%"]


def build_fortune_topic(seed: int = 0) -> Examples:
    """Fortunes labelled computers / politics / science / songs_poems.

    Args:
        seed: Unused (the data are fixed).

    Returns:
        Deduplicated examples.
    """
    del seed
    texts, labels = [], []
    for label, name in enumerate(_FORTUNE_FILES):
        for e in fortune_entries(name):
            texts.append(e)
            labels.append(label)
    return _dedupe(texts, labels)


def _register_builtins() -> None:
    common: dict[str, Any] = {"cache": True, "version": _BUILTIN_VERSION, "overwrite": True}
    register_task(
        "wn_defmatch",
        build_wn_defmatch,
        ("different", "defines"),
        "accuracy",
        "pair",
        description="(noun lemma, WordNet definition) -> does it define the lemma "
        "(negatives: same supersense); balanced.",
        **common,
    )
    register_task(
        "kjv_section",
        build_kjv_section,
        ("law", "prophets", "gospels_acts", "epistles_revelation"),
        "macro_f1",
        "single",
        description="KJV verse -> section of the Bible.",
        **common,
    )
    register_task(
        "fortune_topic",
        build_fortune_topic,
        ("computers", "politics", "science", "songs_poems"),
        "macro_f1",
        "single",
        description="fortune(6) entry -> file it comes from.",
        **common,
    )
    register_task(
        "wn_supersense",
        build_wn_supersense,
        tuple(_SUPERSENSES),
        "macro_f1",
        "single",
        description="WordNet noun definition -> supersense (lexicographer file).",
        **common,
    )
    register_task(
        "py_package",
        _build_py_package,
        ("asyncio", "xml", "multiprocessing", "email"),
        "macro_f1",
        "single",
        description="Python standard-library function (source) -> its package.",
        **common,
    )
    register_mirror_task("wn_defmatch", overwrite=True)


def _build_py_package(seed: int = 0) -> Examples:
    from umtam_jax.experiments.code_task import build_py_package

    return build_py_package(seed)


_register_builtins()
