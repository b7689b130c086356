"""Kurmanji numbers read as words, against readings written down by others (docs/text.md lists the sources):

- WIKT: ku.wiktionary, Pêvek:Rastnivîsî/Hejmar (the orthography appendix's number list),
- ESPEAK: espeak-ng's Kurmanji rules (dictsource/ku_list, `espeak-ng -v ku -x`),
- ZINAR: Zeynelabidîn Zinar, "Di kurdî de hawayê jimartinê" (years with a case suffix),
- THACKSTON: W. M. Thackston, Kurmanji Kurdish: A Reference Grammar, § 9.1 (ordinals; the forms below are the
  user's yekem, duyem, sêyem and WIKT's pêncem, with the same -em/-yem rule),
- USER: the examples our first user gave when the normaliser was specified.
"""

import pytest

from voicetune.common import kurmanji_text
from voicetune.common.kurmanji_text import normalize

# (written, read, source). Where a source joins the hundreds (WIKT dused, ZINAR Nehsed) the golden string is the
# source's with the one documented spelling choice applied by hand: hundreds as two words.
GOLDEN = [
    ("0", "sifir", "WIKT"),
    ("1", "yek", "WIKT"), ("2", "du", "WIKT"), ("3", "sê", "WIKT"), ("4", "çar", "WIKT"), ("5", "pênc", "WIKT"),
    ("6", "şeş", "WIKT"), ("7", "heft", "WIKT"), ("8", "heşt", "WIKT"), ("9", "neh", "WIKT"), ("10", "deh", "WIKT"),
    ("11", "yazdeh", "WIKT"), ("12", "dazdeh", "WIKT"), ("13", "sêzdeh", "WIKT"), ("14", "çardeh", "WIKT"),
    ("15", "pazdeh", "WIKT"), ("16", "şazdeh", "WIKT"), ("17", "hevdeh", "WIKT"), ("18", "hejdeh", "WIKT"),
    ("19", "nozdeh", "WIKT"),
    ("20", "bîst", "WIKT"), ("21", "bîst û yek", "WIKT"), ("30", "sî", "WIKT"), ("40", "çil", "WIKT"),
    ("50", "pêncî", "WIKT"), ("60", "şêst", "ESPEAK"), ("70", "heftê", "WIKT"), ("80", "heştê", "WIKT"),
    ("90", "nod", "WIKT"),
    ("100", "sed", "WIKT"), ("101", "sed û yek", "WIKT"), ("123", "sed û bîst û sê", "WIKT"),
    ("110", "sed û deh", "ESPEAK"), ("200", "du sed", "ESPEAK"),
    ("1000", "hezar", "WIKT"), ("1 234", "hezar û du sed û sî û çar", "WIKT"),
    ("1001", "hezar û yek", "ESPEAK"), ("2000", "du hezar", "ESPEAK"), ("2003", "du hezar û sê", "ESPEAK"),
    ("1987", "hezar û neh sed û heştê û heft", "USER, ESPEAK"),
    ("10000", "deh hezar", "ESPEAK"), ("100000", "sed hezar", "ESPEAK"), ("1 000 000", "milyon", "WIKT"),
    ("2500000", "du milyon û pênc sed hezar", "ESPEAK"), ("1000000000", "milyar", "WIKT"),
    # Thousands separators (groups of three) and decimals.
    ("1.000", "hezar", "WIKT"), ("1,500", "hezar û pênc sed", "ESPEAK"), ("3.25", "sê xal du pênc", "ESPEAK"),
    # A case suffix on the last spoken word.
    ("Di sala 1981ê de", "Di sala hezar û neh sed û heştê û yekê de", "ZINAR"),
    ("Di sala 1984an de", "Di sala hezar û neh sed û heştê û çaran de", "ZINAR"),
    ("Di sala 1987an de", "Di sala hezar û neh sed û heştê û heftan de", "ZINAR"),
    ("Di sala 1987'an de", "Di sala hezar û neh sed û heştê û heftan de", "ZINAR"),
    ("Di sala 1987’an de", "Di sala hezar û neh sed û heştê û heftan de", "ZINAR"),
    # Ordinals: -em, -yem after a vowel, and -emîn.
    ("1em", "yekem", "THACKSTON"), ("2yem", "duyem", "THACKSTON"), ("3yem", "sêyem", "THACKSTON"),
    ("4em", "çarem", "THACKSTON"), ("5em", "pêncem", "WIKT"), ("1emîn", "yekemîn", "THACKSTON"),
    ("%25", "ji sedî bîst û pênc", "USER"), ("25%", "ji sedî bîst û pênc", "USER"),
    ("Ez 25 salî me.", "Ez bîst û pênc salî me.", "USER, WIKT"),
]


@pytest.mark.parametrize("written, read, source", GOLDEN)
def test_numbers_read_as_the_sources_read_them(written, read, source):
    assert normalize(written) == read


@pytest.mark.parametrize("written, what", [
    ("Germahî -5 e", "-"), ("Ew $25 e", "$"), ("Ew 25 € e", "€"), ("Germahî 5°C e", "°C"), ("Rê 25 km e", "km"),
    ("Nîv 1/2 e", "/"), ("2 + 2", "+"), ("1000000000000", "larger than the billions"),
])
def test_what_has_no_agreed_reading_is_refused_with_the_reason(written, what):
    with pytest.raises(kurmanji_text.Unreadable, match=what.replace("$", r"\$").replace("+", r"\+")):
        normalize(written)


def test_a_reading_given_for_a_symbol_is_said_after_its_number():
    assert normalize("$25 û -5 °C", {"$": "dolar", "-": "mînus", "°C": "pileyên celsiusê"}) == \
        "bîst û pênc dolar û mînus pênc pileyên celsiusê"


def test_the_table_is_where_a_reading_is_chosen():
    """A native speaker who prefers espeak-ng's 12 and joined hundreds changes only READINGS."""
    readings = {"12": "danzdeh", "900": "nehsed"}
    assert normalize("1912an", readings) == "hezar û nehsed û danzdehan"


def test_text_without_numbers_and_words_already_read_are_left_alone():
    text = "Ez bîst û pênc salî me, Wan’ê û “bavo”."
    assert normalize(text) == text
    assert normalize(normalize("Di sala 1987an de 25% & 3,5")) == normalize("Di sala 1987an de 25% & 3,5")


def test_a_feedback_text_with_digits_trains_as_words(tiny_model_dir, tmp_path):
    """audio_NNN.txt saying "25" trains the voice on bîst û pênc (speech.clean_text reads numbers everywhere)."""
    import soundfile as sf

    from voicetune.common import speech
    from voicetune.feedback import feedback_run
    from voicetune.voice import models
    from examples.make_release import espeak_clip

    folder = tmp_path / "feedback"
    folder.mkdir()
    sf.write(folder / "audio_001.wav", espeak_clip("Ez bîst û pênc salî me.", 16000), 16000)
    (folder / "audio_001.txt").write_text("Ez 25 salî me.\n", encoding="utf-8")
    _, tokenizer = models.load_voice(tiny_model_dir)
    _, vocab = speech.load_vocab(tiny_model_dir)
    clipset, sentences, skipped, _ = feedback_run.load_feedback(str(folder), tokenizer, vocab, 16000,
                                                                str(tmp_path / "cache"), 1)
    assert sentences == [("audio_001.wav", "ez bîst û pênc salî me")] and skipped == []
    assert list(clipset.tokens[0]) == speech.token_ids(tokenizer, "ez bîst û pênc salî me")


# The rules of docs/text.md's table that no source above gives a string for: each expected reading is built
# from READINGS' words by that rule.
@pytest.mark.parametrize("written, read", [
    ("05", "sifir pênc"), ("007", "sifir sifir heft"), ("0532", "sifir pênc sê du"),
    ("Jimar 0044 e", "Jimar sifir sifir çar çar e"),
    ("0", "sifir"),  # one digit alone is a number, not a code
])
def test_a_leading_zero_is_a_code_read_digit_by_digit_from_two_digits_on(written, read):
    assert normalize(written) == read


@pytest.mark.parametrize("written, read", [
    # A group of exactly three digits after . , or a space is thousands, whichever the sign.
    ("1.000", "hezar"), ("1,000", "hezar"), ("1 000", "hezar"), ("1.000.000", "milyon"),
    # No-break and thin spaces separate thousands as a plain space does (typeset text, ku.wiktionary's 1 000).
    ("1\u00a0000", "hezar"), ("10\u202f000", "deh hezar"), ("2\u2009500\u2009000", "du milyon û pênc sed hezar"),
    ("Ez 3\u00a0250 sêv dixwim", "Ez sê hezar û du sed û pêncî sêv dixwim"),
    # Otherwise the sign is a decimal point: xal, the digits after it one by one.
    ("3,5", "sê xal pênc"), ("1.2345", "yek xal du sê çar pênc"), ("0,5", "sifir xal pênc"),
    # Both in one number: the thousands sign, then the other one as the decimal point.
    ("12.345,67", "dazdeh hezar û sê sed û çil û pênc xal şeş heft"), ("1,000.5", "hezar xal pênc"),
])
def test_thousands_are_groups_of_three_after_a_separator_and_otherwise_it_is_a_decimal_point(written, read):
    assert normalize(written) == read


def test_one_sign_both_between_thousands_and_before_decimals_is_refused():
    with pytest.raises(kurmanji_text.Unreadable, match=r"1,000,5: , used both between thousands and before decimals"):
        normalize("1,000,5")


@pytest.mark.parametrize("written, read", [
    ("COVID-19", "COVID-nozdeh"), ("A-4", "A-çar"),  # after a letter: part of a name
    ("Ji 2003-2005", "Ji du hezar û sê du hezar û pênc"),  # after a digit: a range, two numbers
    ("Ji 2003–2005", "Ji du hezar û sê du hezar û pênc"),  # an en dash as well
    ("Ew 5-6 sêv in", "Ew pênc şeş sêv in"),
])
def test_a_hyphen_after_a_digit_or_a_letter_is_no_minus_and_a_range_is_two_numbers(written, read):
    assert normalize(written) == read
