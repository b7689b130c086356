"""speech.py: the prep-to-train contract: text cleaning (a sentence in another script dropped, never
repaired into Latin; the voice's own letters never repaired), token ids, audio loading and trimming, and
metadata.csv read alike by every script."""

import collections
import io
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from transformers import AutoTokenizer, pipeline, VitsTokenizer

from voicetune.night import clip_data
from voicetune.voice import models
import prepare_data
from voicetune.common import speech
import train_feedback as tf
import train_vits
from voicetune.voice import voice_quality
from conftest import one_error_line, QUICK
from examples.make_release import espeak_clip
from examples.tiny_model import KURMANJI_VOCAB
from voicetune.common.speech import load_vocab, token_ids


@pytest.mark.parametrize("raw, expected", [
    ("Em ê sibê biçin Wan’ê.", "em ê sibê biçin wan'ê"),
    ("“Rojbaş,” jinikê got.", "rojbaş jinikê got"),
    ("Wî got: \"Ez naçim malê.", "wî got ez naçim malê"),
    ("’’Were!’’ got.", "were got"),
    ("- Tu çawa yî? – Ez baş im…", "tu çawa yî ez baş im"),
    ("İro DAYIKA mın", "iro dayika min"),
    ("S\u0327ev  dirêj\tbû", "şev dirêj bû"),
    ("a|b", "a b"),
    ("Kurdistan-ê xweş e", "kurdistan-ê xweş e"),
    ("bajêr,gund", "bajêr gund"),
    # Letters from other keyboards and quotes typed as apostrophes, as the real corpus holds them.
    ("Ez dīnim ū tu dērî", "ez dînim û tu dêrî"),
    ("Erdoğan û Gök hatin", "erdogan û gok hatin"),
    ("D\u0430r\u0430 s\u0435vê \u043e zar\u043ek", "dara sevê o zarok"),
    ('Wî got "ez"ê nizanim', "wî got ezê nizanim"),
    ("“Azadî”yê û «Kurdistan»ê", "azadîyê û kurdistanê"),
    ('got"ez', "got ez"),
    ("‘bavo’ hat", "bavo hat"),
    ("Tîpa 'W' ye", "tîpa w ye"),
    ("Qur’an û Qur'an", "qur'an û qur'an"),
])
def test_clean_text_gives_text_the_tokenizer_keeps_whole(raw, expected, tiny_model_dir):
    tokenizer, vocab = speech.load_vocab(tiny_model_dir)
    text, reason = speech.clean_text(raw, vocab)
    assert (text, reason) == (expected, None)
    assert tokenizer.prepare_for_tokenization(text)[0] == text


@pytest.mark.parametrize("raw, reason", [
    ("Ew $25 e.", "unreadable_number"),
    ("ئەمڕۆ هەوا خۆشە", "other_script"),
    ("Привет", "other_script"),
    ("Müzîk û dar", "unsupported_letter"),
    # A Cyrillic word only of Latin look-alikes stays Cyrillic; so does one beside other Cyrillic letters.
    ("\u0441\u043e\u0440\u043e\u043a", "other_script"),
    ("Ez \u0441\u043e\u0440\u043e\u043a \u043f\u0430", "other_script"),
    ("“…” - !", "empty_text"),
])
def test_clean_text_drops_what_the_voice_cannot_say(raw, reason, tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    assert speech.clean_text(raw, vocab) == (None, reason)


def test_clean_text_counts_every_repair_of_a_kept_text(tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    repairs = Counter()
    speech.clean_text("Rīya dīrok û ‘b\u0430vo’ \"ez\"ê", vocab, repairs)
    speech.clean_text("Dīrok $25", vocab, repairs)  # dropped (unreadable_number): its repairs are not counted
    assert repairs == {"ī→î": 2, "а→a (Cyrillic)": 1, "apostrophe used as a quote": 2, "quote before a suffix": 1}


def test_load_vocab_is_the_speakable_alphabet(tiny_model_dir):
    _, vocab = speech.load_vocab(tiny_model_dir)
    assert set("abcdefghijklmnopqrstuvwxyzçêîşû '-") == vocab


@pytest.fixture(scope="module")
def n_pad_voice(tiny_model_dir, tmp_path_factory):
    """The tiny voice with an MMS-like vocabulary: id 0 (pad and blank) is the letter "n", as for Kurmanji."""
    out = str(tmp_path_factory.mktemp("n_pad_voice"))
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    letters = [ch for ch in KURMANJI_VOCAB if ch not in ("_", "n")]
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({ch: i for i, ch in enumerate(["n"] + letters)}, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("added_tokens_decoder", None)
    config["pad_token"] = "n"
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return out


def blank_interleaved(vocab, text):
    ids = [0]
    for ch in text:
        ids += [vocab[ch], 0]
    return ids


# Begin, end and double the pad letter; the last holds none.
PAD_LETTER_SENTENCES = ["nan", "ew dinnivîse û dixwîne", "sibe ez ê biçim"]


def test_pad_letter_sentences_get_every_blank_in_training_and_when_exported(n_pad_voice, tmp_path):
    model, tokenizer = models.load_voice(n_pad_voice)
    vocab = tokenizer.get_vocab()
    assert tokenizer.pad_token == "n" and vocab["n"] == 0
    expected = [blank_interleaved(vocab, text) for text in PAD_LETTER_SENTENCES]
    plain = VitsTokenizer.from_pretrained(n_pad_voice)
    assert plain("nan").input_ids != expected[0], "VitsTokenizer no longer splits on its pad letter: the check is void"

    pcm, mel = np.zeros(16000, np.int16), np.zeros((80, 62), np.float16)
    clips = clip_data.ClipSet([(f"{i}.wav", text, pcm, mel) for i, text in enumerate(PAD_LETTER_SENTENCES)], tokenizer)
    assert [list(ids) for ids in clips.tokens] == expected
    prepare_tokenizer, _ = load_vocab(n_pad_voice)
    assert [token_ids(prepare_tokenizer, text) for text in PAD_LETTER_SENTENCES] == expected

    # The listening samples speak the same ids.
    spoken = []
    model.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: spoken.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    voice_quality.synthesise(model, tokenizer, PAD_LETTER_SENTENCES, str(tmp_path / "samples"))
    assert spoken == expected

    # An exported voice gives the same ids to whoever reloads it.
    out = str(tmp_path / "voice")
    models.export_voice(model, tokenizer, models.VitsDiscriminator(max_channels=64), out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert [reloaded(text).input_ids for text in PAD_LETTER_SENTENCES] == expected
    tts = pipeline("text-to-speech", model=out, device="cpu")
    assert [tts.preprocess(text)["input_ids"][0].tolist() for text in PAD_LETTER_SENTENCES] == expected


def test_load_audio_mixes_resamples_and_trims(tmp_path):
    clip = espeak_clip("Roj li pişt çiyayan ava dibe.", 44100, stereo=True)
    silence = np.zeros((44100, 2), dtype=np.float32)
    sf.write(tmp_path / "a.mp3", np.concatenate([silence, clip, silence]), 44100)
    full = speech.load_audio(str(tmp_path / "a.mp3"), 16000)
    trimmed = speech.load_audio(open(tmp_path / "a.mp3", "rb"), 16000, trim=True)
    assert full.dtype == np.float32 and full.ndim == 1 and np.abs(full).max() <= 1.0
    speech_samples = len(clip) * 16000 // 44100
    assert abs(len(full) - (speech_samples + 2 * 16000)) < 2000
    # The added second of silence at each end goes; the clip, quiet edges included, stays.
    assert len(trimmed) <= speech_samples + 2 * 1024
    assert np.sum(trimmed.astype(np.float64) ** 2) > 0.999 * np.sum(full.astype(np.float64) ** 2)


def test_load_audio_mixes_stereo_down_to_the_mean_of_its_channels(tmp_path):
    clip = espeak_clip("Dara sêvê li ber malê ye.", 44100)
    sf.write(tmp_path / "mono.wav", clip, 44100, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", np.stack([clip, 0.5 * clip], axis=1), 44100, subtype="FLOAT")
    mono = speech.load_audio(str(tmp_path / "mono.wav"), 16000)
    stereo = speech.load_audio(str(tmp_path / "stereo.wav"), 16000)
    assert stereo.shape == mono.shape and np.allclose(stereo, 0.75 * mono, atol=1e-5)


def test_trim_keeps_speech_that_runs_to_the_edges():
    # A recording cut mid-word, at a length that is no multiple of the trim hop.
    tone = (0.5 * np.sin(np.arange(16000 + 100) * 0.1)).astype(np.float32)
    assert len(speech.trim_silence(tone)) == len(tone)
    padded = np.concatenate([np.zeros(5000, np.float32), tone])
    assert len(tone) <= len(speech.trim_silence(padded)) < len(tone) + 1024
    assert len(speech.trim_silence(np.zeros(8000, np.float32))) == 0


@pytest.mark.parametrize("data, reason", [(b"", "empty_file"), (b"not audio at all\n" * 50, "corrupt_audio")])
def test_load_audio_rejects_unreadable_input(data, reason, tmp_path):
    (tmp_path / "x.mp3").write_bytes(data)
    for source in (str(tmp_path / "x.mp3"), io.BytesIO(data)):
        with pytest.raises(speech.AudioError) as err:
            speech.load_audio(source, 16000)
        assert err.value.reason == reason


def test_rows_are_read_alike_by_every_script(prepared_dataset, tiny_model_dir, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(prepared_dataset, data)
    with open(os.path.join(data, "metadata.csv"), encoding="utf-8") as f:
        (a, text_a), (b, text_b) = [line.rstrip("\n").split("|") for line in f][:2]
    outside = str(tmp_path / "outside.wav")
    shutil.copy(os.path.join(data, "wavs", b), outside)
    lines = [f"{a}|{text_a}", f"{a}|{text_b}",  # a duplicate: the first row wins
             f"{b}|raw text|{text_b}",  # name|raw|normalised
             f"{b[:-4]}x.wav|four|fields|here",  # malformed
             f"../{os.path.basename(outside)}|{text_b}", f"{outside}|{text_b}"]  # paths leaving wavs/
    with open(os.path.join(data, "metadata.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    left_out = collections.Counter()
    assert speech.read_metadata(os.path.join(data, "metadata.csv"), left_out) == [(a, text_a), (b, text_b)]
    assert left_out == {"duplicate": 1, "malformed_row": 1, "bad_path": 2}

    out = str(tmp_path / "out")
    shutil.copy(outside, os.path.join(data, "outside.wav"))  # within reach of ../ from wavs/
    report = prepare_data.main(["--input", data, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    assert report["kept_clips"] == 2
    assert report["dropped"] == {"duplicate": 1, "malformed_row": 1, "bad_path": 2}
    with open(os.path.join(out, "metadata.csv"), encoding="utf-8") as f:
        assert f.read() == f"{a}|{text_a}\n{b}|{text_b}\n"


def test_metadata_that_is_not_utf8_is_one_line(prepared_dataset, tiny_model_dir, tmp_path, capsys):
    data = str(tmp_path / "data")
    os.makedirs(os.path.join(data, "wavs"))
    with open(os.path.join(data, "metadata.csv"), "wb") as f:
        f.write("a.wav|Ez bi kurdî diaxivim.\n".encode("cp1254"))
    assert train_vits.main(["--model", tiny_model_dir, "--data_dir", data, "--output_dir", str(tmp_path / "run")]
                   + QUICK) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)
    assert tf.main(["--model", tiny_model_dir, "--data_dir", prepared_dataset, "--feedback_dir", data,
                    "--output_dir", str(tmp_path / "feedback_run")] + QUICK) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------- Cyrillic and the voice's own letters

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
