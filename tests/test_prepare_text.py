"""speech.clean_text's letter repairs: a sentence in another script is dropped as other_script, never
"repaired" into Latin gibberish, and a repair never replaces a letter the voice's own alphabet has."""

import collections

import pytest

import speech


@pytest.fixture
def vocab(tiny_model_dir):
    return speech.load_vocab(tiny_model_dir)[1]


# Cyrillic letters that each look like a Latin one (с о р е а у х і): alone, they are still Cyrillic.
@pytest.mark.parametrize("cyrillic", ["\u0441\u043e\u0440\u0435",
                                      "\u0430\u0441\u0435 \u0443\u0445\u043e \u0456\u0440\u0430",
                                      "\u0421\u041e\u0420\u0415."])
def test_a_sentence_of_cyrillic_letters_only_is_dropped_as_another_script(cyrillic, vocab):
    repairs = collections.Counter()
    assert speech.clean_text(cyrillic, vocab, repairs) == (None, "other_script")
    assert not repairs


def test_a_cyrillic_look_alike_in_a_latin_sentence_is_repaired(vocab):
    repairs = collections.Counter()
    # "Ez çay vedixwim" typed with a Cyrillic а (U+0430) in "çay".
    # (lowercased: the voice has no capitals)
    assert speech.clean_text("Ez \u00e7\u0430y vedixwim", vocab, repairs) == ("ez \u00e7ay vedixwim", None)
    assert repairs == {"\u0430\u2192a (Cyrillic)": 1}


def test_a_repair_never_replaces_a_letter_of_the_voices_own_alphabet(vocab):
    # Turkish ı and ö, a macron ī, and a Cyrillic а: repaired for a voice without them...
    text = "\u0131 \u00f6 \u012b b\u0430"
    assert speech.clean_text(text, vocab) == ("i o \u00ee ba", None)
    # ...kept, letter for letter, by a voice whose alphabet has them.
    own = vocab | {"\u0131", "\u00f6", "\u012b", "\u0430"}
    repairs = collections.Counter()
    assert speech.clean_text(text, own, repairs) == (text, None)
    assert not repairs
