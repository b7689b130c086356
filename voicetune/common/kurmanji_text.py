"""Kurmanji text as a voice reads it: numbers written with digits become words.

    >>> normalize("Ez 25 salî me.")
    'Ez bîst û pênc salî me.'
    >>> normalize("Di sala 1987an de")
    'Di sala hezar û neh sed û heştê û heftan de'

Pure Python with no dependencies, so a server that speaks with the exported voice can import it alone.
Every word it says comes from READINGS below; where the sources disagree the choice is there, with the
sources in docs/text.md. A number or symbol it has no agreed reading for raises Unreadable with the reason:
nothing is silently dropped.
"""

import re

# The reading choices: change a word here and every number that uses it follows.
READINGS = {
    "0": "sifir", "1": "yek", "2": "du", "3": "sê", "4": "çar", "5": "pênc", "6": "şeş", "7": "heft",
    "8": "heşt", "9": "neh", "10": "deh",
    # 11-19: ku.wiktionary's orthography appendix; espeak-ng says yazde, danzde, panzde, şanzde, hivdeh, hijdeh.
    "11": "yazdeh", "12": "dazdeh", "13": "sêzdeh", "14": "çardeh", "15": "pazdeh", "16": "şazdeh",
    "17": "hevdeh", "18": "hejdeh", "19": "nozdeh",
    # 60: espeak-ng and Husein Muhammed's standard form; ku.wiktionary writes şêşt.
    "20": "bîst", "30": "sî", "40": "çil", "50": "pêncî", "60": "şêst", "70": "heftê", "80": "heştê",
    "90": "nod",
    # 100 and 1000 without yek; the hundreds as two words, as espeak-ng reads them (ku.wiktionary joins them:
    # dused).
    "100": "sed", "200": "du sed", "300": "sê sed", "400": "çar sed", "500": "pênc sed", "600": "şeş sed",
    "700": "heft sed", "800": "heşt sed", "900": "neh sed",
    "1000": "hezar", "1000000": "milyon", "1000000000": "milyar",
    "and": "û",  # between every two parts of a number: hezar û neh sed û heştê û heft
    "decimal": "xal",  # espeak-ng's word for the decimal point; the digits after it are read one by one
    "%": "ji sedî",  # said before the number, wherever the sign is written
    "&": "û",
}

# Symbols with no reading the sources agree on: refused with the reason, unless a reading is given (speak.py
# --reading SYMBOL=WORDS). A unit is looked for right after a number.
NO_AGREED_READING = {
    "-": "a minus sign before a number",
    "−": "a minus sign before a number",
    "+": "a plus sign",
    "=": "an equals sign",
    "/": "a fraction or date written with /",
    "$": "a currency sign",
    "€": "a currency sign",
    "£": "a currency sign",
    "₺": "a currency sign",
    "°C": "a unit",
    "°": "a unit",
    "km": "a unit",
    "kg": "a unit",
    "cm": "a unit",
    "mm": "a unit",
}

VOWELS = "aeêiîouû"
LARGEST = 10 ** 12  # up to the billions (milyar)
APOSTROPHES = "'\u2019\u2018\u02bc"
# Spaces between groups of three digits are thousands separators (1 000, as ku.wiktionary writes them).
SPACES = " \u00a0\u202f\u2009"
# A number as written: thousands grouped by threes (1.000, 1,000, 1 000) or plain digits, a decimal part, a
# percent sign on either side, and a case or ordinal suffix written on it (1987an, 1987'an, 2003yan, 25ê, 2yem),
# which always starts with a vowel or the glide y.
NUMBER = re.compile(
    rf"(?P<pct_before>%\s?)?"
    rf"(?P<int>\d{{1,3}}(?:(?P<sep>[.,{SPACES}])\d{{3}}(?!\d))(?:(?P=sep)\d{{3}}(?!\d))*|\d+)"
    rf"(?:(?P<point>[.,])(?P<frac>\d+))?"
    rf"(?P<pct_after>\s?%)?"
    rf"(?P<suffix>[{APOSTROPHES}]?y?[{VOWELS}][a-zçêîşû]*)?",
    re.IGNORECASE)


class Unreadable(ValueError):
    """Text with a number or symbol that has no reading; the message says which and why."""


def number_words(n, readings=READINGS):
    """The cardinal `n` (0 <= n < 10**12) in words: 1987 → hezar û neh sed û heştê û heft."""
    if n >= LARGEST:
        raise Unreadable(f"{n}: larger than the billions")
    if n == 0:
        return readings["0"]
    parts = []
    for scale in (10 ** 9, 10 ** 6, 1000):
        count, n = divmod(n, scale)
        if count:
            word = readings[str(scale)]
            parts.append(word if count == 1 else f"{number_words(count, readings)} {word}")
    hundreds, rest = divmod(n, 100)
    if hundreds:
        parts.append(readings[str(hundreds * 100)])
    if rest and (rest <= 20 or rest % 10 == 0):
        parts.append(readings[str(rest)])
    elif rest:
        parts += [readings[str(rest - rest % 10)], readings[str(rest % 10)]]
    return f" {readings['and']} ".join(parts)


def add_suffix(words, suffix):
    """A case or ordinal suffix on the last spoken word, the glide y between two vowels: du + an → duyan."""
    suffix = suffix.lstrip(APOSTROPHES).lower()
    if suffix[0] == "y" and suffix[1:2] and suffix[1] in VOWELS:
        suffix = suffix[1:]  # the glide as written after the digit; said again only after a vowel
    glide = "y" if words[-1] in VOWELS else ""
    return words + glide + suffix


def read_number(match, readings):
    whole = match.group("int")
    sep = match.group("sep")
    if sep and match.group("point") == sep:
        raise Unreadable(f"{match.group(0)}: {sep} used both between thousands and before decimals")
    digits = re.sub(rf"[.,{SPACES}]", "", whole)
    if len(digits) > 1 and digits[0] == "0":
        words = " ".join(readings[str(int(d))] for d in digits)  # 0532...: a code, said digit by digit
    else:
        words = number_words(int(digits), readings)
    if match.group("frac"):
        words += f" {readings['decimal']} " + " ".join(readings[str(int(d))] for d in match.group("frac"))
    if match.group("suffix"):
        words = add_suffix(words, match.group("suffix"))
    if match.group("pct_before") or match.group("pct_after"):
        words = f"{readings['%']} {words}"
    return words


CURRENCIES = "$€£₺"


def symbol_pattern(symbol):
    """Where `symbol` stands for words: a unit right after a number, a minus before one, a / between two, a
    currency or other sign anywhere."""
    escaped = re.escape(symbol)
    if symbol in "-−":
        return rf"(?<![\w-]){escaped}(?=\d)"
    if symbol == "/":
        return r"(?<=\d)\s?/\s?(?=\d)"
    if symbol.isalpha() or symbol.startswith("°"):
        return rf"(?<=\d)\s?{escaped}(?![^\W\d_])"
    return escaped


def normalize(text, readings=None):
    """`text` with every number in words; raises Unreadable naming the first number or symbol it cannot read.

    `readings` adds to or overrides READINGS (a symbol of NO_AGREED_READING given a reading is then read: a
    currency after its number, $25 as 25 $). Letters, punctuation and case are left as they are, for the
    voice's own text cleaning.
    """
    table = {**READINGS, **(readings or {})}
    # Longest first: °C is a unit of its own, not ° followed by a C.
    for symbol in sorted(NO_AGREED_READING, key=len, reverse=True):
        pattern = symbol_pattern(symbol)
        if symbol not in table:
            found = re.search(pattern, text, re.IGNORECASE)
            if found:
                raise Unreadable(f"{symbol}: {NO_AGREED_READING[symbol]} has no agreed Kurmanji reading "
                                 "(write it in words)")
            continue
        if symbol in CURRENCIES:
            text = re.sub(rf"{pattern}\s?(\d[\d.,{SPACES}]*\d|\d)", rf"\1 {symbol}", text)
        text = re.sub(pattern, f" {table[symbol]} ", text, flags=re.IGNORECASE)
    text = text.replace("&", f" {table['&']} ")
    text = re.sub(r"(?<=\d)[-–](?=\d)", " ", text)  # 2003-2005: two numbers, not one hyphenated word
    text = NUMBER.sub(lambda m: read_number(m, table), text)
    return re.sub(r" {2,}", " ", text).strip()


def split_sentences(text):
    """Sentences of `text`, split only after a sentence's end (. ! ? …) followed by a space: never at a comma,
    which would break the voice's intonation. Call it on normalized text, where 3.5 is already words."""
    return [s for s in re.split(r"(?<=[.!?…])\s+", text.strip()) if s]
