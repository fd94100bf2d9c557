"""WordNet 3.0 glosses (definitions) read from Debian's `wordnet-base` package.

`load_glosses()` -> [Gloss(synset, lexfile, text)], one per synset of data.noun, data.verb,
data.adj and data.adv (117,659 in all); `split(glosses)` -> (train, held_out), by synset.
Install the files with `apt-get install wordnet-base`; nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import NamedTuple, Sequence

# Where `dpkg -L wordnet-base` puts the database (Debian 12, wordnet-base 1:3.0-37).
DEFAULT_PATH = '/usr/share/wordnet'

# The 45 lexicographer files, numbered as in WordNet 3.0's lexnames(5WN); lex_filenum indexes this.
LEXNAMES = (
    'adj.all', 'adj.pert', 'adv.all', 'noun.Tops', 'noun.act', 'noun.animal', 'noun.artifact',
    'noun.attribute', 'noun.body', 'noun.cognition', 'noun.communication', 'noun.event',
    'noun.feeling', 'noun.food', 'noun.group', 'noun.location', 'noun.motive', 'noun.object',
    'noun.person', 'noun.phenomenon', 'noun.plant', 'noun.possession', 'noun.process',
    'noun.quantity', 'noun.relation', 'noun.shape', 'noun.state', 'noun.substance', 'noun.time',
    'verb.body', 'verb.change', 'verb.cognition', 'verb.communication', 'verb.competition',
    'verb.consumption', 'verb.contact', 'verb.creation', 'verb.emotion', 'verb.motion',
    'verb.perception', 'verb.possession', 'verb.social', 'verb.stative', 'verb.weather',
    'adj.ppl',
)  # fmt: skip

# data file -> (synset id prefix, the ss_type letters it holds, its lexnames' prefix).
# Adjective satellites ('s') live in data.adj with head adjectives ('a'): both get prefix 'a'.
PARTS = {
    'noun': ('n', 'n', 'noun.'),
    'verb': ('v', 'v', 'verb.'),
    'adj': ('a', 'as', 'adj.'),
    'adv': ('r', 'r', 'adv.'),
}


class Gloss(NamedTuple):
    """synset: the file's letter + 8-digit offset ('n01234567'); lexfile: 0..44, an index into
    LEXNAMES; text: the gloss after ' | ' (definition and any quoted examples)."""

    synset: str
    lexfile: int
    text: str


def load_glosses(path: str | None = None, parts: Sequence[str] = tuple(PARTS)) -> list[Gloss]:
    """Every synset's gloss from `path`/data.{noun,verb,adj,adv} (default DEFAULT_PATH), in file
    order, noun first. `parts`: a subset of ('noun', 'verb', 'adj', 'adv').

    ValueError naming `apt-get install wordnet-base` when a data file is missing; ValueError
    naming the file and line for a line that is not a WordNet 3.0 synset.
    """
    if isinstance(parts, str):
        parts = (parts,)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f'parts: unknown {unknown}; choose from {list(PARTS)}')
    path = DEFAULT_PATH if path is None else os.fspath(path)
    out: list[Gloss] = []
    for part in parts:
        out.extend(_load_part(os.path.abspath(path), part))
    return out


def _load_part(path: str, part: str) -> tuple[Gloss, ...]:
    file = os.path.join(path, f'data.{part}')
    try:
        stat = os.stat(file)
    except OSError:
        raise ValueError(
            f'WordNet: {file} not found; install the WordNet 3.0 database with '
            '`apt-get install wordnet-base` (or pass path= a directory holding data.noun, '
            'data.verb, data.adj and data.adv)'
        ) from None
    return _read(file, part, stat.st_mtime_ns, stat.st_size)


# 117k lines take a fraction of a second: read each file once (a rewritten file is read again).
@functools.lru_cache(maxsize=8)
def _read(file: str, part: str, mtime_ns: int, size: int) -> tuple[Gloss, ...]:
    prefix, types, lexprefix = PARTS[part]
    out = []
    with open(file, encoding='utf-8') as f:
        for number, line in enumerate(f, start=1):
            if line.startswith('  '):  # the license header
                continue
            try:
                out.append(_parse(line, prefix, types, lexprefix))
            except (ValueError, IndexError) as e:
                raise ValueError(
                    f'WordNet: {file}:{number} is not a WordNet 3.0 synset line ({e}): '
                    f'{line[:60]!r}'
                ) from None
    return tuple(out)


def _parse(line: str, prefix: str, types: str, lexprefix: str) -> Gloss:
    head, sep, gloss = line.partition(' | ')
    if not sep:
        raise ValueError("no ' | ' before a gloss")
    offset, lexfile, ss_type = head.split(' ', 3)[:3]
    if len(offset) != 8 or not offset.isdigit():
        raise ValueError(f'offset {offset!r} is not 8 digits')
    if ss_type not in types:
        raise ValueError(f'ss_type {ss_type!r} does not belong in this file')
    number = int(lexfile)
    # The lexicographer file must be one of this part of speech (noun.* in data.noun, ...).
    name = LEXNAMES[number] if 0 <= number < len(LEXNAMES) else 'out of range'
    if not name.startswith(lexprefix):
        raise ValueError(f'lex_filenum {lexfile} ({name}) is not one of the {lexprefix}* files')
    return Gloss(prefix + offset, number, gloss.strip())


def split(
    glosses: Sequence[Gloss], held_out: float = 0.1, seed: int = 0
) -> tuple[list[Gloss], list[Gloss]]:
    """(kept, held out), each in input order: a synset is held out when a hash of (seed, synset
    id) falls below `held_out` (0 <= held_out <= 1), so the split is the same in every process
    and a synset is never on both sides, whatever the order or subset of `glosses`."""
    if not 0.0 <= held_out <= 1.0:
        raise ValueError(f'held_out: expected a fraction in [0, 1], got {held_out}')
    kept, held = [], []
    for g in glosses:
        (held if _unit(seed, g[0]) < held_out else kept).append(g)
    return kept, held


def _unit(seed: int, synset: str) -> float:
    # blake2b, not hash(): Python salts str hashes per process.
    digest = hashlib.blake2b(f'{int(seed)}:{synset}'.encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'big') / 2.0**64
