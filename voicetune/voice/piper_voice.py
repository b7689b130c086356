"""The voice as a piper voice (`ku_TR-<name>-low.onnx` + `.onnx.json` + MODEL_CARD) that piper, wyoming-piper
(Home Assistant) and sherpa-onnx load from the one .onnx file, checked against the torch voice with piper's own
text-to-ids path before it is written.

piper's `phoneme_type: "text"` feeds codepoints, but every piper runtime first decomposes the text to NFD, so
ç ê î û ş arrive as a base letter and a combining mark, framed by piper's pad/begin/end ids 0/1/2 (libpiper
hard-codes them). The graph therefore starts with a small front end: the voice's ids are offset by 3 (OFFSET),
each combining mark is folded into the letter before it, the frame ids are dropped, runs of spaces (punctuation
reads as a space, as our text cleaning reads it) collapse and the MMS blanks are put back around every letter.
The VITS graph behind it is onnx_voice's own, merged in whole.

sherpa-onnx runs the same file as a "piper" model with a character frontend: its metadata says so, and
tokens.txt maps each character to the ids piper would give it.
"""

import json
import os
import re
import shutil
import unicodedata

import numpy as np

from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.voice import onnx_voice

OFFSET = 3  # piper's pad "_", begin "^" and end "$" are ids 0, 1 and 2
FRAME = {"_": [0], "^": [1], "$": [2]}
QUALITY = "low"  # piper's name for a 16 kHz voice
LANGUAGE = {"code": "ku_TR", "family": "ku", "region": "TR", "name_native": "Kurmancî",
            "name_english": "Kurmanji Kurdish", "country_english": "Turkey"}  # as the catalog's Kurmanji voice
ESPEAK_VOICE = "ku"
# What a sentence holds besides words; our text cleaning reads each as a space between the words.
PUNCTUATION = ".,;:!?…()[]{}«»\"“”„/–—"
BASE_LICENSE = "CC-BY-NC-4.0"  # facebook/mms-tts-kmr-script_latin, the voice every tune starts from
CARD_FILE = "MODEL_CARD"
# Sentences the export is checked on besides the vocabulary's letters: capitals, typographic apostrophes,
# punctuation; any the voice cannot read are left out.
CHECK_SENTENCES = ["Şêr, û çiya li Wan’ê ne.", "ÇÊÎŞÛ çêîşû", "Qur’an: «Roj baş!»", "Îro êvarê em ê herin."]


def stem(name):
    """`ku_TR-<name>-low`: the file stem, the voice's key in wyoming-piper and its dataset."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"{LANGUAGE['code']}-{slug or 'voice'}-{QUALITY}"


def id_map(tokenizer):
    """(phoneme_id_map, marks, space): every character piper may send (the voice's letters and what users type
    for them, the combining marks NFD leaves, punctuation) → [id], the marks in the order of their ids after
    the vocabulary's, and the space's voice id (None when the voice has no space)."""
    lines = [(ch, i) for ch, i in onnx_voice.token_lines(tokenizer) if ch not in FRAME]
    table = {ch: [i + OFFSET] for ch, i in lines}
    table.update(FRAME)
    space = dict(lines).get(" ")
    if space is not None:
        table.update({ch: [space + OFFSET] for ch in PUNCTUATION if ch not in table})
    marks = sorted({m for ch, _ in lines for m in unicodedata.normalize("NFD", ch) if unicodedata.combining(m)}
                   | {m for ch in speech.LETTER_FIXES for m in unicodedata.normalize("NFD", ch + ch.upper())
                      if unicodedata.combining(m)} | {speech.COMBINING_DOT_ABOVE})
    first = vocab_size(tokenizer) + OFFSET
    table.update({m: [first + k] for k, m in enumerate(marks)})
    return table, marks, space


def vocab_size(tokenizer):
    return max(tokenizer.get_vocab().values()) + 1


def fold_table(tokenizer, marks):
    """[vocab, 1 + marks] voice ids: column 0 each letter itself, column k+1 the letter that letter + marks[k]
    composes to (ş for s + cedilla; the letter itself where nothing composes, as ğ reads g)."""
    ids = dict(onnx_voice.token_lines(tokenizer))
    own = {}
    for ch, i in onnx_voice.token_lines(tokenizer):
        own.setdefault(i, ch)
    size = vocab_size(tokenizer)
    table = np.tile(np.arange(size, dtype=np.int64)[:, None], (1, len(marks) + 1))
    for i, ch in own.items():
        for k, mark in enumerate(marks):
            composed = unicodedata.normalize("NFC", ch + mark)
            table[i, k + 1] = ids.get(composed, ids.get(speech.LETTER_FIXES.get(composed, ""), i))
    return table


def front_end(table, blank, space, multi_speaker, path):
    """Trace the front end (piper's inputs → the VITS graph's inputs) into its own ONNX file."""
    import torch

    size = table.shape[0]
    width = table.shape[1]
    folds = torch.from_numpy(table.reshape(-1))

    class Front(torch.nn.Module):
        def forward(self, input, input_lengths, scales, sid=None):
            ids = input[0, :input_lengths[0]]
            ids = ids[ids >= OFFSET] - OFFSET
            after = torch.cat([ids[1:], torch.zeros(1, dtype=ids.dtype)])
            mark = torch.where(after >= size, after - size + 1, torch.zeros_like(after))
            letters = folds[ids.clamp(max=size - 1) * width + mark][ids < size]
            if space is not None:
                is_space = letters == space
                # A space after a space or at the start, or with nothing said after it, is not spoken.
                said = (~is_space).long().cumsum(0)
                repeated = torch.cat([torch.ones(1, dtype=torch.bool), is_space[:-1]])
                trailing = said == (~is_space).long().sum()
                letters = letters[~(is_space & (repeated | trailing))]
            x = torch.stack([torch.full_like(letters, blank), letters], 1).reshape(-1)
            x = torch.cat([x, torch.full((1,), blank, dtype=x.dtype)])[None]
            out = (x, torch.ones(1, dtype=torch.long) * x.shape[1], scales[0:1], scales[1:2], scales[2:3])
            return out + ((sid * 1,) if multi_speaker else ())

    example = torch.tensor([[1, 0, 3 + 5, 0, 3 + 6, 0, 2]])
    args = (example, torch.tensor([example.shape[1]]), torch.tensor([0.667, 1.0, 0.8]))
    names = ["input", "input_lengths", "scales"] + (["sid"] if multi_speaker else [])
    outputs = onnx_voice.INPUTS + (["sid_"] if multi_speaker else [])
    if multi_speaker:
        args += (torch.tensor([0]),)
    torch.onnx.export(Front().eval(), args, path, input_names=names, output_names=outputs,
                      opset_version=onnx_voice.OPSET, dynamic_axes={"input": {1: "phonemes"}, "x": {1: "tokens"}},
                      dynamo=False)


def merge(front_path, voice_path, path):
    """The front end and the VITS graph as one file; the VITS graph's own names under "vits/"."""
    import onnx
    from onnx import compose

    front, voice = onnx.load(front_path), onnx.load(voice_path)
    outputs = [o.name for o in front.graph.output]
    io_map = [(name, "sid" if name == "sid_" else name) for name in outputs]
    merged = compose.merge_models(front, voice, io_map=io_map, prefix2="vits/")
    onnx.save(merged, path)


def config(model, tokenizer, name, table, speaker_names):
    """The .onnx.json piper and wyoming-piper read."""
    hop = int(np.prod(model.config.upsample_rates))
    return {
        "dataset": name, "audio": {"sample_rate": model.config.sampling_rate, "quality": QUALITY},
        "espeak": {"voice": ESPEAK_VOICE}, "language": LANGUAGE,
        "inference": {"noise_scale": round(float(model.noise_scale), 6),
                      "length_scale": round(1.0 / float(model.speaking_rate), 6),
                      "noise_w": round(float(model.noise_scale_duration), 6)},
        "phoneme_type": "text", "phoneme_map": {}, "phoneme_id_map": table,
        "num_symbols": max(i for ids in table.values() for i in ids) + 1,
        "num_speakers": max(model.config.num_speakers, 1), "speaker_id_map": speaker_names,
        "hop_length": hop, "piper_version": "1.0.0",
    }


def speaker_names(model_dir, speakers):
    """{name: id} of a multi-speaker voice (speakers.json's client ids, else speaker_N); {} for one speaker."""
    if speakers <= 1:
        return {}
    from voicetune.voice import speakers as speaker_tables

    rows = speaker_tables.read_table(model_dir) or []
    names = {int(row["id"]): str(row["client_id"]) for row in rows}
    return {names.get(i, f"speaker_{i}"): i for i in range(speakers)}


def metadata(model, tokenizer, speakers):
    """onnx_voice's sherpa-onnx metadata for a "piper" graph: piper's inputs, the frame ids it may send."""
    meta = onnx_voice.metadata(model, tokenizer, speakers)
    meta.update(comment="piper", language=LANGUAGE["name_english"], blank_id=FRAME["_"][0],
                pad_id=FRAME["_"][0], bos_id=FRAME["^"][0], eos_id=FRAME["$"][0], use_eos_bos=0)
    return meta


def model_card(name, meta, data_licence, model_dir):
    speakers = meta["n_speakers"]
    return f"""# {name}

A Kurmanji (ku_TR) piper voice, {meta['sample_rate']} Hz ("{QUALITY}"), {speakers} speaker{'s' * (speakers > 1)},
fine-tuned with voicetune from {os.path.basename(os.path.abspath(model_dir))}.

## Licence

- Base voice: facebook/mms-tts-kmr-script_latin (Meta's Massively Multilingual Speech), licence {BASE_LICENSE}:
  no commercial use; credit Meta's MMS project. This voice is a derivative of it and carries that licence.
- Training data: {data_licence}

## Files

- `{name}.onnx` + `{name}.onnx.json`: piper and wyoming-piper (Home Assistant) load them from a data folder.
- `tokens.txt`: sherpa-onnx loads the same `{name}.onnx` with it (a "piper" graph, character frontend).

piper reads no digits: write numbers as words, or serve the voice with `python speak.py --serve`, which reads
them (25 → bîst û pênc).
"""


def check_sentences(tokenizer, vocab):
    """Sentences covering every letter of the voice, in lower and upper case, CHECK_SENTENCES, and one far
    beyond the text encoder's relative-attention window; only those our text cleaning can read."""
    letters = "".join(sorted(ch for ch in vocab if ch.isalpha()))
    words = " ".join(letters[i:i + 6] for i in range(0, len(letters), 6))
    candidates = [words, words.upper(), letters[:1]] + CHECK_SENTENCES + [" ".join([words] * 4)]
    return [s for s in candidates if speech.clean_text(s, vocab)[1] is None]


def verify(model, tokenizer, vocab, onnx_path, json_path, sentences, speaker_id):
    """ExportError unless piper (its own text → ids, then the graph) says what the torch voice says at zero
    noise for each sentence as our text cleaning reads it."""
    from piper import PiperVoice
    from piper.config import SynthesisConfig

    from voicetune.voice import speaking

    voice = PiperVoice.load(onnx_path, json_path)
    zero = SynthesisConfig(speaker_id=speaker_id, noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0,
                           normalize_audio=False)
    saved = {name: getattr(model, name) for name in ("noise_scale", "noise_scale_duration", "speaking_rate")}
    model.noise_scale = model.noise_scale_duration = 0.0
    model.speaking_rate = 1.0
    try:
        for sentence in sentences:
            cleaned, _ = speech.clean_text(sentence, vocab)
            expected = speaking.say(model, tokenizer, cleaned, speaker_id)
            [phonemes] = voice.phonemize(sentence)
            got = np.asarray(voice.phoneme_ids_to_audio(voice.phonemes_to_ids(phonemes), zero)).reshape(-1)
            if len(got) != len(expected):
                raise onnx_voice.ExportError(f"piper says {sentence!r} in {len(got)} samples, the torch voice in "
                                             f"{len(expected)}: not written")
            peak = max(float(np.abs(expected).max()), 1e-6)
            worst = float(np.abs(got - expected).max())
            if worst > onnx_voice.MAX_DIFFERENCE * peak:
                raise onnx_voice.ExportError(f"piper differs from the torch voice by {worst / peak:.2g} of the peak "
                                             f"on {sentence!r} (speaker {speaker_id}): not written")
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


def token_file(name):
    return f"{name}.tokens.txt"


def export(model, tokenizer, vocab, model_dir, out_dir, name, data_licence):
    """Write OUT_DIR/<stem>.onnx + .onnx.json + .tokens.txt + .md (the model card) after checking piper against
    the torch voice (verify) for the first and last speaker; ExportError, writing nothing, if it differs. Each
    file is renamed into place whole, the .onnx.json last: a data folder never shows a voice half written, and
    the other voices of the folder stay."""
    import onnx

    model = model.float().cpu().eval()
    speakers = max(model.config.num_speakers, 1)
    name = stem(name)
    out_dir = os.path.abspath(out_dir)
    tmp = run_folder.temp_name(os.path.join(out_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        table, marks, space = id_map(tokenizer)
        onnx_voice.trace(model, os.path.join(tmp, "vits.onnx"), speakers > 1)
        front_end(fold_table(tokenizer, marks), tokenizer.pad_token_id, space, speakers > 1,
                  os.path.join(tmp, "front.onnx"))
        path = os.path.join(tmp, f"{name}.onnx")
        merge(os.path.join(tmp, "front.onnx"), os.path.join(tmp, "vits.onnx"), path)
        graph = onnx.load(path)
        meta = metadata(model, tokenizer, speakers)
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=str(value))
        onnx.save(graph, path)
        files = {f"{name}.onnx": None,
                 token_file(name): "".join(f"{ch} {ids[0]}\n" for ch, ids in table.items() if ch not in FRAME),
                 f"{name}.md": model_card(name, meta, data_licence, model_dir),
                 f"{name}.onnx.json": json.dumps(config(model, tokenizer, name, table,
                                                        speaker_names(model_dir, speakers)),
                                                 indent=2, ensure_ascii=False)}
        for file, text in files.items():
            if text is not None:
                run_folder.write_atomically(os.path.join(tmp, file), text.encode("utf-8"), durable=False)
        for sid in sorted({0, speakers - 1}):
            verify(model, tokenizer, vocab, path, os.path.join(tmp, f"{name}.onnx.json"),
                   check_sentences(tokenizer, vocab), sid if speakers > 1 else None)
        for file in files:
            os.replace(os.path.join(tmp, file), os.path.join(out_dir, file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(out_dir, f"{name}.onnx")


def export_folder(model_dir, out_dir, name, data_licence, **settings):
    """speak.py --export_piper: the voice in `model_dir` with its speaking settings (they become the piper voice's
    inference scales) written into the piper data folder `out_dir`; one line saying why when it differs."""
    from voicetune.voice import speaking

    model, tokenizer = speaking.load(model_dir, **settings)
    vocab = speech.load_vocab(model_dir)[1]
    try:
        path = export(model, tokenizer, vocab, model_dir, out_dir, name, data_licence)
    except onnx_voice.ExportError as err:
        raise run_errors.TrainingError(f"--export_piper {out_dir}: {err}") from None
    print(f"wrote {path} + .onnx.json + .tokens.txt + .md (piper says what the torch voice says on every letter, "
          "capitals and apostrophes)")
