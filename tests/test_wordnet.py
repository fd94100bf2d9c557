"""ljax.wordnet: WordNet 3.0 glosses from Debian's wordnet-base."""

import collections
import os
import random
import subprocess
import sys

import pytest

from ljax import wordnet


@pytest.fixture(scope='module')
def glosses():
    return wordnet.load_glosses()


def test_synset_counts_per_file():
    # WordNet 3.0's published synset counts.
    counts = {part: len(wordnet.load_glosses(parts=part)) for part in wordnet.PARTS}
    assert counts == {'noun': 82115, 'verb': 13767, 'adj': 18156, 'adv': 3621}


def test_offsets_are_byte_offsets(glosses):
    """WordNet's synset offset is the byte offset of its line in the data file: every parsed
    synset sits exactly there, so no line was skipped, merged or split."""
    by_letter = collections.defaultdict(list)
    for g in glosses:
        by_letter[g.synset[0]].append(int(g.synset[1:]))
    for part, (letter, _, _) in wordnet.PARTS.items():
        with open(os.path.join(wordnet.DEFAULT_PATH, f'data.{part}'), 'rb') as f:
            data = f.read()
        starts = [0] + [i + 1 for i, b in enumerate(data) if b == 10][:-1]
        synsets = [s for s in starts if data[s : s + 2] != b'  ']
        assert by_letter[letter] == synsets, part


def test_fields(glosses):
    assert len({g.synset for g in glosses}) == len(glosses)
    # Every one of the 45 lexicographer files holds synsets, each of its own part of speech.
    assert {g.lexfile for g in glosses} == set(range(45)) and len(wordnet.LEXNAMES) == 45
    prefix = {letter: lex for letter, _, lex in wordnet.PARTS.values()}
    assert all(wordnet.LEXNAMES[g.lexfile].startswith(prefix[g.synset[0]]) for g in glosses)
    assert all(g.text and g.text == g.text.strip() and ' | ' not in g.text for g in glosses)
    adverbs = wordnet.load_glosses(parts=['adv'])
    gloss = 'without musical accompaniment; "they performed a cappella"'
    assert adverbs[0] == ('r00001740', 2, gloss)
    assert wordnet.LEXNAMES[adverbs[0].lexfile] == 'adv.all'
    dog = next(g for g in glosses if g.synset == 'n02084071')
    assert wordnet.LEXNAMES[dog.lexfile] == 'noun.animal' and 'domesticated' in dog.text


def test_split_is_by_synset_and_deterministic(glosses):
    kept, held = wordnet.split(glosses)
    assert len(kept) + len(held) == len(glosses)
    assert not {g.synset for g in kept} & {g.synset for g in held}
    # About 10%: the binomial standard deviation here is 0.09 points.
    assert abs(len(held) / len(glosses) - 0.1) < 0.005
    assert wordnet.split(glosses) == (kept, held)
    # Order and subset do not move a synset across the split; another seed does.
    held_ids = {g.synset for g in held}
    sample = random.Random(1).sample(glosses, 5000)
    sample_held = {g.synset for g in wordnet.split(sample)[1]}
    assert sample_held == held_ids & {g.synset for g in sample}
    assert {g.synset for g in wordnet.split(glosses, seed=1)[1]} != held_ids
    assert wordnet.split(glosses, held_out=0.0)[1] == []
    assert wordnet.split(glosses, held_out=1.0)[0] == []
    with pytest.raises(ValueError, match=r'held_out: expected a fraction in \[0, 1\]'):
        wordnet.split(glosses, held_out=10)


def test_split_is_the_same_in_another_process(glosses):
    adverbs = [g for g in glosses if g.synset[0] == 'r']
    here = sorted(g.synset for g in wordnet.split(adverbs, seed=3)[1])
    # The module file alone (it needs only the standard library): no jax import to wait for.
    code = (
        'import importlib.util as u, sys; '
        f's = u.spec_from_file_location("wordnet", {wordnet.__file__!r}); '
        'w = u.module_from_spec(s); sys.modules["wordnet"] = w; s.loader.exec_module(w); '
        'a = w.load_glosses(parts="adv"); '
        'print(" ".join(sorted(g.synset for g in w.split(a, seed=3)[1])))'
    )
    # A different str-hash salt: the split must not depend on Python's hash().
    env = dict(os.environ, PYTHONHASHSEED='12345')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == here


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match='apt-get install wordnet-base'):
        wordnet.load_glosses(tmp_path)
    data = tmp_path / 'data.adv'
    data.write_text('  1 license header\n00000001 02 r 01 fine 0 000 | a gloss  \n')
    assert wordnet.load_glosses(tmp_path, parts='adv') == [('r00000001', 2, 'a gloss')]
    # A rewritten file is read again, not served from the cache.
    data.write_text(data.read_text() + '00000002 02 r 01 nogloss 0 000\n')
    with pytest.raises(ValueError, match=r'data.adv:3 is not a WordNet 3.0 synset line'):
        wordnet.load_glosses(tmp_path, parts='adv')
    data.write_text('00000001 05 r 01 fine 0 000 | a gloss\n')
    with pytest.raises(ValueError, match=r'lex_filenum 05 \(noun.animal\) is not one of the adv'):
        wordnet.load_glosses(tmp_path, parts='adv')
    with pytest.raises(ValueError, match='parts: unknown'):
        wordnet.load_glosses(parts='nouns')
