"""Generate a Common Voice-shaped Kurmanji release from real speech (espeak-ng -v ku), fully offline.

Tests, the README demo and benchmarks use it instead of downloading Common Voice. The folder looks like
`cv-corpus-*/kmr/` of a real release: `clips/*.mp3` (mostly 32 kHz mono, some 48 kHz, some 44.1 kHz
stereo, with a little silence around the speech), `validated.tsv` and the other TSVs with the real
columns and no quoting (sentences hold typographic and unbalanced quotes), `clip_durations.tsv`.
`--bad` adds one clip of each kind prepare_data.py must drop (see BAD_KINDS).

    python examples/make_release.py --output_dir example_run/cv-kmr --clips 24
    python examples/make_release.py --output_dir /tmp/cv-kmr --clips 2000 --bad \\
        --tarball /tmp/cv-corpus-99.0-2026-01-01-kmr.tar.gz
"""

import argparse
import csv
import hashlib
import io
import os
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import soundfile as sf

RELEASE_NAME = "cv-corpus-99.0-2026-01-01"
LOCALE = "kmr"
ESPEAK_RATE = 22050
CLIP_COLUMNS = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes",
                "age", "gender", "accents", "variant", "locale", "segment"]
EMPTY_TSVS = ["invalidated.tsv", "other.tsv", "reported.tsv", "dev.tsv", "test.tsv"]

# Real Kurmanji sentences. The first ones carry the punctuation Common Voice texts hold: typographic and
# unbalanced quotes, a typographic apostrophe, a dialogue dash, an ellipsis, a decomposed ş, a dotless ı.
SENTENCES = [
    "\"Ez îro naçim malê, wî got.",
    "“Rojbaş,” jinikê bi ken got.",
    "Em ê sibê biçin Wan’ê.",
    "- Tu çawa yî? - Ez baş im…",
    "S\u0327ev dirêj bû û stêrk geş bûn.",
    "Dayika mın nanê germ çêdike.",
    "Ez ji Amedê me û niha li Stenbolê dijîm.",
    "Îro hewa pir xweş e, em ê herin çiyê.",
    "Zarok di baxçe de dilîzin.",
    "Ev pirtûk ji bo min gelek girîng e.",
    "Sibê ez ê biçim bazarê.",
    "Bavê wî mamoste ye li gundê me.",
    "Çiya bi berfê spî bûne.",
    "Tu dikarî ji min re alîkarî bikî?",
    "Em hemû bi hev re xwarinê dixwin.",
    "Ji kerema xwe deriyê vekin!",
    "Xwişka min li zanîngehê dixwîne.",
    "Av ji kaniyê sar û zelal e.",
    "Hevalên min îşev tên mala me.",
    "Ez zimanê kurdî hîn dibim.",
    "Baran dibare, sîwana xwe bigire.",
    "Rêya gund dûr e, lê xweş e.",
    "Pisîk li ser pencereyê razaye.",
    "Wî nameyek dirêj ji diya xwe re nivîsî.",
    "Ez çayê bê şekir vedixwim.",
    "Dema havînê em diçin zozanan.",
    "Ev stran ji aliyê dengbêjekî ve hatiye gotin.",
    "Hespê spî li mêrgê direve.",
    "Li bajêr gelek otomobîl hene.",
    "Mamoste dersê bi hêdî şîrove dike.",
    "Dara sêvê li ber malê ye.",
    "Şivan pezê xwe ber bi çiyê dibe.",
    "Ew her roj rojnameyê dixwîne.",
    "Xwarina îro pir bi tam bû.",
    "Zivistan li herêma me sar û dirêj e.",
    "Bira û xwişk bi hev re diçin dibistanê.",
    "Dengê çûkan ji daristanê tê.",
    "Gundî li zeviyê genim diçînin.",
    "Roj li pişt çiyayan ava dibe.",
    "Ev çîrok ji kalê min maye.",
]

# Each kind of clip prepare_data.py must drop, named as the reason it is counted under.
BAD_KINDS = ("missing_file", "empty_file", "corrupt_audio", "silent", "too_short", "too_long", "unreadable_number",
             "other_script", "too_few_frames", "implausible_rate", "malformed_row")

# espeak-ng voice variants, speeds (words/min) and pitches give the "speakers" audibly different voices.
VOICES = ["ku", "ku+m3", "ku+f2", "ku+m1", "ku+f4", "ku+m7"]


def espeak_clip(text, sr, voice="ku", speed=165, pitch=50, stereo=False):
    """Speak `text` with espeak-ng; float32 audio at `sr`, shape (n,) or (n, 2) when `stereo`."""
    # Text goes in on stdin: a sentence that starts with "- " would otherwise be read as an option.
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--stdin"],
                         input=text.encode(), capture_output=True, check=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = librosa.resample(audio, orig_sr=rate, target_sr=sr) if rate != sr else audio
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    if stereo:
        # Slightly different channels, as from a real stereo microphone.
        audio = np.stack([audio, 0.8 * audio], axis=1)
    return audio


def pad_silence(audio, sr, seconds, rng):
    """Surround speech with near-silent room noise (-70 dBFS), as a microphone records it."""
    shape = (int(seconds * sr),) + audio.shape[1:]
    before, after = (rng.standard_normal((2,) + shape) * 3e-4).astype(np.float32)
    return np.concatenate([before, audio, after])


def write_mp3(path, audio, sr):
    # Constant bitrate at compression 0.9 (~56 kbit/s) keeps a committed sample small and still clear.
    sf.write(path, audio, sr, format="MP3", bitrate_mode="CONSTANT", compression_level=0.9)


def client_id(k):
    return hashlib.sha512(f"kmr-speaker-{k}".encode()).hexdigest()


def clip_plan(n_clips, sentences, rng):
    """Per good clip: (sentence, speaker index, sample rate, stereo). Clip 0 is 48 kHz, clip 1 stereo."""
    n_speakers = max(1, min(len(VOICES) * 4, n_clips // 6))
    # Common Voice is dominated by a few prolific speakers: draw speakers from a Zipf-like weighting.
    weights = 1.0 / np.arange(1, n_speakers + 1)
    speakers = rng.choice(n_speakers, size=n_clips, p=weights / weights.sum())
    plan = []
    for i in range(n_clips):
        draw = rng.random()
        sr, stereo = (48000, False) if draw < 0.12 else (44100, True) if draw < 0.2 else (32000, False)
        if i == 0:
            sr, stereo = 48000, False
        elif i == 1:
            sr, stereo = 44100, True
        plan.append((sentences[i % len(sentences)], int(speakers[i]), sr, stereo))
    return plan


def speaker_voice(k):
    """espeak-ng settings (voice, speed, pitch) of speaker `k`; stable across runs."""
    return VOICES[k % len(VOICES)], 150 + (k * 7) % 36, 35 + (k * 11) % 30


def render_good(job):
    path, text, speaker, sr, stereo, seed = job
    voice, speed, pitch = speaker_voice(speaker)
    audio = pad_silence(espeak_clip(text, sr, voice, speed, pitch, stereo), sr, 0.25, np.random.default_rng(seed))
    write_mp3(path, audio, sr)
    return round(len(audio) / sr * 1000)


def render_bad(kind, path, sentences, rng):
    """Write the audio of one bad clip; return (sentence for the TSV, duration in ms or None)."""
    sr = 32000
    long_text = " ".join(sentences[:8])
    if kind == "missing_file":
        return sentences[0], None
    if kind == "empty_file":
        open(path, "wb").close()
        return sentences[1], None
    if kind == "corrupt_audio":
        with open(path, "wb") as f:
            f.write(b"this is not an mp3 file\n" * 100)
        return sentences[2], None
    if kind == "silent":
        audio = np.zeros(3 * sr, dtype=np.float32)
        text = sentences[3]
    elif kind == "too_short":
        # Long enough before trimming; the speech itself is well under a second.
        text = "Na."
        audio = pad_silence(espeak_clip(text, sr), sr, 0.8, rng)
    elif kind == "too_long":
        text = " ".join(sentences[5:14])
        audio = espeak_clip(text, sr)
    elif kind == "unreadable_number":
        text = "Ew $25 e."  # a currency sign: no agreed Kurmanji reading
        audio = espeak_clip(text, sr)
    elif kind == "other_script":
        text = "ئەمڕۆ هەوا زۆر خۆشە."
        audio = espeak_clip(sentences[6], sr)
    elif kind == "too_few_frames":
        # Text of eight sentences on the audio of one: more token ids than spectrogram frames.
        text = long_text
        audio = espeak_clip(sentences[7], sr)
    elif kind == "implausible_rate":
        # One word on ten seconds of speech.
        text = "Erê."
        audio = espeak_clip(" ".join(sentences[8:12]), sr)
    else:
        raise ValueError(f"unknown bad clip kind {kind!r}; choose from {', '.join(BAD_KINDS)}")
    write_mp3(path, audio, sr)
    return text, round(len(audio) / sr * 1000)


def tsv_row(client, path, sentence):
    sentence_id = hashlib.sha256(sentence.encode()).hexdigest()
    return [client, path, sentence_id, sentence, "", "2", "0", "", "", "", "", LOCALE, ""]


def write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_release(out_dir, n_clips, seed=0, sentences=None, bad_kinds=(), workers=None):
    """Write a Common Voice language folder with `n_clips` good clips plus one clip per `bad_kinds`."""
    sentences = sentences or SENTENCES
    rng = np.random.default_rng(seed)
    clips_dir = os.path.join(out_dir, "clips")
    os.makedirs(clips_dir, exist_ok=True)

    jobs, rows = [], []
    for i, (text, speaker, sr, stereo) in enumerate(clip_plan(n_clips, sentences, rng)):
        name = f"common_voice_{LOCALE}_{40000000 + i}.mp3"
        jobs.append((os.path.join(clips_dir, name), text, speaker, sr, stereo, seed * 1_000_003 + i))
        rows.append(tsv_row(client_id(speaker), name, text))
    # espeak-ng runs as a subprocess and libsndfile/soxr release the GIL, so threads keep every core busy.
    with ThreadPoolExecutor(max_workers=workers or 2 * (os.cpu_count() or 1)) as pool:
        durations = [(row[1], ms) for row, ms in zip(rows, pool.map(render_good, jobs))]

    malformed = []
    for j, kind in enumerate(bad_kinds):
        name = f"common_voice_{LOCALE}_{49000000 + j}.mp3"
        if kind == "malformed_row":
            malformed.append(["broken row", name, "without the other columns"])
            continue
        text, ms = render_bad(kind, os.path.join(clips_dir, name), sentences, rng)
        rows.append(tsv_row(client_id(1000 + j), name, text))
        if ms is not None:
            durations.append((name, ms))

    write_tsv(os.path.join(out_dir, "validated.tsv"), CLIP_COLUMNS, rows + malformed)
    write_tsv(os.path.join(out_dir, "train.tsv"), CLIP_COLUMNS, rows[:n_clips])
    for name in EMPTY_TSVS:
        write_tsv(os.path.join(out_dir, name), CLIP_COLUMNS, [])
    write_tsv(os.path.join(out_dir, "clip_durations.tsv"), ["clip", "duration[ms]"], durations)
    unique = sorted({row[3] for row in rows})
    write_tsv(os.path.join(out_dir, "validated_sentences.tsv"),
              ["sentence_id", "sentence", "sentence_domain", "source", "is_used", "clips_count"],
              [[hashlib.sha256(s.encode()).hexdigest(), s, "", "generated", "1", "1"] for s in unique])
    return out_dir


def make_tarball(language_dir, tar_path, release_name=RELEASE_NAME, locale=LOCALE):
    """Pack `language_dir` as `release_name/locale/...`, the layout of a Common Voice release tarball."""
    tmp = f"{tar_path}.tmp"
    mode = "w:gz" if tar_path.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(tmp, mode) as tar:
        # Clips before the TSVs: a reader must cope with finding the clip list last.
        for folder, _, files in sorted(os.walk(language_dir)):
            for name in sorted(files):
                path = os.path.join(folder, name)
                arcname = os.path.join(release_name, locale, os.path.relpath(path, language_dir))
                if os.path.basename(folder) == "clips":
                    tar.add(path, arcname)
        for name in sorted(os.listdir(language_dir)):
            if name.endswith(".tsv"):
                tar.add(os.path.join(language_dir, name), os.path.join(release_name, locale, name))
    os.replace(tmp, tar_path)
    return tar_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="example_run/cv-kmr", help="Language folder to write. (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=24, help="Number of good clips. (default: %(default)s)")
    parser.add_argument("--bad", action="store_true", help="Also add one clip of each bad kind. (default: off)")
    parser.add_argument("--tarball", default=None,
                        help="Also pack the folder into this .tar.gz (or .tar) with the release layout. (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="Seed for speakers, formats and noise. (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="Parallel espeak-ng calls. (default: 2 per core)")
    args = parser.parse_args(argv)
    if args.clips < 1:
        parser.error("--clips must be at least 1")
    make_release(args.output_dir, args.clips, args.seed, bad_kinds=BAD_KINDS if args.bad else (),
                 workers=args.workers)
    print(f"release written to {args.output_dir}")
    if args.tarball:
        make_tarball(args.output_dir, args.tarball)
        print(f"tarball written to {args.tarball}")


if __name__ == "__main__":
    main()
