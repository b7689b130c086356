"""The prep-to-train contract, without torch: how a clip's audio is read, trimmed and written, how its
text is cleaned for the voice and turned into token ids, and how metadata.csv rows are read and written.

prepare_data.py writes training/wavs/*.wav + metadata.csv with these functions; the trainers read them
back with the same ones, so a clip means the same thing on both sides. Decoding workers import this
module, so it never imports torch.
"""

import io
import ntpath
import os
import re
import unicodedata
from collections import Counter

import librosa
import numpy as np
import soundfile as sf

from voicetune.common import kurmanji_text
from voicetune.common import run_errors
from voicetune.common import run_folder

SAMPLE_RATE = 16000
HOP_LENGTH = 256  # VITS spectrogram hop at 16 kHz: frames = samples // 256
# A clip whose loudest 64 ms window stays below -50 dBFS holds no usable speech.
SILENCE_DBFS = -50.0
TRIM_FRAME = 1024
TRIM_HOP = 256
# Typographic apostrophes Common Voice contributors type instead of '.
APOSTROPHES = "\u2019\u2018\u02bc\u02b9\u00b4\u0060\u2032"
# Double quotation marks; one between a quoted word and its suffix ("ez"ê) is not a word break.
QUOTES = "\"\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a"
# Letters the Kurmanji alphabet lacks, typed on other keyboards for the one it has; only exact equivalents,
# and only where the voice lacks the letter.
LETTER_FIXES = {
    "\u0131": "i",  # dotless ı (Turkish keyboards)
    "\u012b": "\u00ee",  # ī → î: a long vowel marked with a macron instead of a circumflex
    "\u016b": "\u00fb",  # ū → û
    "\u0113": "\u00ea",  # ē → ê
    "\u011f": "g",  # ğ, in Turkish spellings of names
    "\u00f6": "o",  # ö, in Turkish spellings of names
}
# Cyrillic letters drawn exactly like a Latin one (а е о р с у х і ј ѕ һ ԛ ԝ), typed inside Latin text.
CYRILLIC_LOOK_ALIKES = dict(zip("\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u0458\u0455\u04bb\u051b\u051d",
                                "aeopcyxijshqw"))
COMBINING_DOT_ABOVE = "\u0307"  # left behind when "İ" is lowercased


class AudioError(ValueError):
    """A clip that cannot be used as audio; `reason` is the name it is counted under."""

    def __init__(self, message, reason="corrupt_audio"):
        super().__init__(message)
        self.reason = reason


def load_audio(source, target_sr, trim=False, top_db=40.0):
    """Decode `source` (a path or binary file object) to float32 mono in [-1, 1] at `target_sr`."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise AudioError("file not found", "missing_file")
        if os.path.getsize(source) == 0:
            raise AudioError("empty file", "empty_file")
    else:
        # libsndfile needs to seek; tar streams cannot, so buffer the (small) clip.
        data = source.read()
        if not data:
            raise AudioError("empty file", "empty_file")
        source = io.BytesIO(data)
    try:
        audio, sr = sf.read(source, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports corrupt input with several exception types
        raise AudioError(f"cannot decode audio ({str(err).split(': ')[-1].strip()})") from None
    if audio.shape[0] == 0:
        raise AudioError("no audio samples", "empty_file")
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise AudioError("audio holds NaN or infinite samples")
    if sr != target_sr:
        audio = librosa.resample(audio, orig_sr=sr, target_sr=target_sr)
    # Resampling can overshoot full scale by a hair; 16-bit output must not wrap around.
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return trim_silence(audio, top_db) if trim else audio


def frame_power(audio):
    """Mean power of each TRIM_FRAME window, TRIM_HOP apart (a short clip is one window)."""
    squares = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    frame = min(TRIM_FRAME, len(audio))
    starts = np.arange(0, len(audio) - frame + 1, TRIM_HOP)
    if starts[-1] != len(audio) - frame:
        # One more window flush with the end, so a clip that ends mid-word keeps its last samples.
        starts = np.append(starts, len(audio) - frame)
    return (squares[starts + frame] - squares[starts]) / max(frame, 1), starts, frame


def trim_silence(audio, top_db=40.0):
    """Cut leading and trailing windows more than `top_db` below the loudest one; all-zero audio → empty."""
    if len(audio) == 0:
        return audio
    power, starts, frame = frame_power(audio)
    peak = power.max()
    if peak <= 0:
        return audio[:0]
    # Whole windows are kept, so a quiet onset inside the first loud window is never cut.
    loud = np.flatnonzero(power >= peak * 10 ** (-top_db / 10))
    return audio[starts[loud[0]]:starts[loud[-1]] + frame]


def is_silent(audio):
    if len(audio) == 0:
        return True
    power, _, _ = frame_power(audio)
    return 10 * np.log10(power.max() + 1e-20) < SILENCE_DBFS


def to_int16(audio):
    """Float audio in [-1, 1] as int16, rounded, read back as `/ 32768`: a 16-bit WAV round-trips exactly.

    (Truncating, `(x * 32767).astype(int16)`, would move every sample a step toward zero and turn quiet
    passages into digital silence.)
    """
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # `org/name`, as the Hugging Face Hub names a voice


def missing_local_voice(name):
    """One line when `name` has the shape of a local folder and no folder is there, else None.

    A Hub id is `org/name`; anything else shaped like a path (./, ../, ~, an absolute path or a drive, a
    backslash, more than two parts, or a first part that is a folder here, as `example_run/final_modl`) names a
    local folder, and a missing one must not be looked up on the Hub: offline that is minutes of retries and an
    error about the network, not about the typo.
    """
    if os.path.isdir(name):
        return None
    first = re.split(r"[\\/]", name)[0]
    if HUB_ID.fullmatch(name) and not os.path.isdir(first):
        return None
    if "/" not in name and "\\" not in name:
        return None  # a bare name: a Hub id of old (gpt2-style), or a file the caller reports itself
    where = "a file, not a voice folder" if os.path.exists(name) else "not found"
    return f"no voice folder at {name} ({where}; a local path is never looked up on the Hub)"


def load_tokenizer(model_name_or_dir):
    """The voice's VitsTokenizer, set up to give the exact ids of `token_ids` to whoever calls it.

    split_special_tokens is saved with the tokenizer, so a voice exported with it gives the same ids
    when reloaded by AutoTokenizer or pipeline("text-to-speech"). A local path that is not there is refused
    before the Hub is asked (run_errors.TrainingError).
    """
    missing = missing_local_voice(model_name_or_dir)
    if missing:
        raise run_errors.TrainingError(missing)
    # Imported here so decoding workers never pay for importing transformers.
    from transformers import VitsTokenizer

    return VitsTokenizer.from_pretrained(model_name_or_dir, split_special_tokens=True)


def token_ids(tokenizer, text):
    """The ids MMS was trained on: each character with a blank (id 0) around it, 2n+1 ids in all.

    In MMS vocabularies id 0 is both the blank and a real letter, the pad token. VitsTokenizer splits the
    text on special tokens before it inserts blanks, so wherever that letter starts or ends a sentence or
    doubles, blanks go missing; split_special_tokens=True keeps the pad letter an ordinary character.
    """
    return tokenizer(text, split_special_tokens=True).input_ids


def load_vocab(model_name_or_dir):
    """Return the model's VitsTokenizer and the set of characters it can speak."""
    tokenizer = load_tokenizer(model_name_or_dir)
    vocab = {token for token in tokenizer.get_vocab() if len(token) == 1}
    # An MMS pad token is a real letter (id 0 doubles as the blank); a symbol like "_" is not speech.
    if tokenizer.pad_token and len(tokenizer.pad_token) == 1 and not tokenizer.pad_token.isalpha():
        vocab.discard(tokenizer.pad_token)
    vocab.discard("|")  # the metadata.csv separator must never be part of a text
    return tokenizer, vocab


def repair_letters(text, vocab, repairs):
    """Letters from other keyboards → the Kurmanji letter they stand for, each counted in `repairs`.

    Cyrillic look-alikes are replaced only in a Latin text whose every Cyrillic letter is one: a Cyrillic
    sentence stays Cyrillic (and is dropped as other_script) instead of becoming Latin gibberish.
    """
    fixes = dict(LETTER_FIXES)
    cyrillic = {ch for ch in text if unicodedata.name(ch, "").startswith("CYRILLIC")}
    latin = any(unicodedata.name(ch, "").startswith("LATIN") for ch in text)
    if cyrillic and latin and cyrillic <= CYRILLIC_LOOK_ALIKES.keys():
        fixes.update(CYRILLIC_LOOK_ALIKES)
    out = []
    for ch in text:
        fix = None if ch in vocab else fixes.get(ch)
        if fix:
            repairs[f"{ch}→{fix}" + (" (Cyrillic)" if ch in CYRILLIC_LOOK_ALIKES else "")] += 1
        out.append(fix or ch)
    return "".join(out)


def clean_text(text, vocab, repairs=None, numbers=True):
    """Normalise `text` for the voice; return (text, None) or (None, reason) when it cannot be spoken.

    Numbers written with digits are read as Kurmanji words (kurmanji_text) first, so every text that meets
    the voice (training, feedback, the listening page, speak.py) says "25" as bîst û pênc; a number or symbol
    with no agreed reading is "unreadable_number". numbers=False keeps digits, which then make the text
    unspeakable ("digits"). The repairs made to a text that can be spoken are added to the Counter `repairs`,
    when given.
    """
    found = Counter()
    text = unicodedata.normalize("NFC", text)
    if numbers:
        try:
            read = kurmanji_text.normalize(text)
        except kurmanji_text.Unreadable:
            return None, "unreadable_number"
        if read != text and any(ch.isdigit() for ch in text):
            found["numbers read as words"] += 1
        text = read
    # Lowercase what the vocab lacks, as VitsTokenizer(normalize=True) does.
    text = "".join(ch if ch in vocab else ch.lower() for ch in text)
    text = text.replace(COMBINING_DOT_ABOVE, "")
    text = unicodedata.normalize("NFC", repair_letters(text, vocab, found))
    apostrophe = "'" if "'" in vocab else ""
    out = []
    for i, ch in enumerate(text):
        before, after = text[i - 1:i], text[i + 1:i + 2]
        if ch in APOSTROPHES or ch == "'":
            if before.isalpha() and after.isalpha():
                out.append(apostrophe)  # inside a word (Wan’ê, Qur’an) it is an apostrophe
                continue
            # At a word's edge it is a quotation mark (‘bavo’, 'W', ’’Were’’): not spoken.
            if before.isalpha() or after.isalpha():
                found["apostrophe used as a quote"] += 1
            out.append(" ")
        elif ch in QUOTES and before.isalpha() and after.isalpha() and quote_opened_in_word(text, i):
            found["quote before a suffix"] += 1  # "ez"ê: the suffix belongs to the quoted word
        elif ch == "|" or unicodedata.category(ch)[0] in "PSZC" and ch not in vocab:
            # The tokenizer would delete punctuation and glue the words around it together.
            out.append("" if unicodedata.category(ch) == "Cf" else " ")
        elif ch == "-" and not (before.isalpha() and after.isalpha()):
            out.append(" ")  # dialogue dashes and dashes between words are not spoken
        else:
            out.append(ch)
    text = re.sub(r"\s+", " ", "".join(out)).strip()
    if not text:
        return None, "empty_text"
    for ch in text:
        if ch in vocab:
            continue
        if ch.isdigit():
            return None, "digits"
        if ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN"):
            return None, "other_script"
        return None, "unsupported_letter"
    if repairs is not None:
        repairs.update(found)
    return text, None


def quote_opened_in_word(text, i):
    """True when the word holding the quote at `i` also holds an earlier quote: this one closes it."""
    word = re.search(r"\S*$", text[:i]).group()
    return any(c in QUOTES or c in APOSTROPHES or c == "'" for c in word)


class MetadataError(ValueError):
    """A metadata.csv that cannot be read as text; the message names the file."""


def parse_metadata(path):
    """Read an LJSpeech `name|text` (or `name|raw|normalised`) file; return ([(file, text)], malformed).

    A line with another number of fields is malformed: its text cannot be told from the rest.
    """
    rows, malformed = [], 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            for line in f:
                fields = line.rstrip("\r\n").split("|")
                if len(fields) not in (2, 3) or not fields[0].strip():
                    if line.strip():
                        malformed += 1
                    continue
                name = fields[0].strip()
                if not os.path.splitext(name)[1]:
                    name += ".wav"
                rows.append((name, fields[-1]))
    except UnicodeDecodeError as err:
        raise MetadataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start} of a line); "
                            "save it as UTF-8") from None
    return rows, malformed


def outside_folder(path):
    """True for a listed path that would leave its folder: absolute, on a drive, or through '..'."""
    return (os.path.isabs(path) or path.startswith(("/", "\\")) or bool(ntpath.splitdrive(path)[0])
            or ".." in re.split(r"[\\/]", path))


def read_metadata(path, left_out=None):
    """Rows of an LJSpeech-style metadata.csv as (wav file name relative to wavs/, text), as prepare_data.py
    keeps them: well-formed rows whose path stays in the folder, the first row of a name winning.

    `left_out`, a Counter, counts the rows left out by reason (malformed_row, bad_path, duplicate).
    """
    rows, malformed = parse_metadata(path)
    left_out = Counter() if left_out is None else left_out
    if malformed:
        left_out["malformed_row"] += malformed
    entries, seen = [], set()
    for name, text in rows:
        reason = "bad_path" if outside_folder(name) else "duplicate" if name in seen else None
        if reason:
            left_out[reason] += 1
            continue
        seen.add(name)
        entries.append((name, text))
    return entries


def write_metadata(path, rows):
    """metadata.csv from [(file, text)]: `file|text` lines, no header, no quoting, replaced atomically."""
    run_folder.write_atomically(path, "".join(f"{name}|{text}\n" for name, text in rows).encode("utf-8"))


SPEAKERS_FILE = "speakers.csv"  # beside metadata.csv: `file|speaker` (Common Voice client_id), one line a clip


def write_speaker_labels(path, rows):
    """speakers.csv from [(file, speaker)], in metadata.csv's own `file|field` format (a file of its own:
    metadata.csv keeps its two columns, so its readers never break)."""
    write_metadata(path, rows)


def read_speaker_labels(path):
    """{file: speaker} of a speakers.csv, or None when there is none (an LJSpeech folder: one voice)."""
    if not os.path.isfile(path):
        return None
    rows, malformed = parse_metadata(path)
    if malformed:
        raise MetadataError(f"{path}: {malformed} lines are not `file|speaker`")
    return {name: speaker.strip() for name, speaker in rows}


def write_wav(path, audio, sampling_rate, durable=False):
    """A 16-bit PCM WAV, replaced atomically. Encoded in memory first, so a full disk raises the OSError
    itself (libsndfile only says "System error")."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, sampling_rate, subtype="PCM_16", format="WAV")
    run_folder.write_atomically(path, buffer.getvalue(), durable=durable)


def join_sentences(clips, sampling_rate, pause):
    """Sentences one after another with `pause` seconds of silence between them (none around a single one)."""
    gap = np.zeros(int(round(pause * sampling_rate)), dtype=np.float32)
    parts = []
    for i, clip in enumerate(clips):
        parts += [gap, clip] if i else [clip]
    return np.concatenate(parts).astype(np.float32)
