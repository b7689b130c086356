"""A voice of several speakers: whose clips train which speaker id (train_vits.py --speakers), the
single-speaker voice made multi-speaker with its new conditioning at exactly zero, and speakers.json, which
names each id of an exported voice by its Common Voice client_id."""

import copy
import json
import os
from collections import Counter

import torch
from transformers import VitsModel

from voicetune.common import run_errors
from voicetune.common import speech

EMBEDDING_SIZE = 256  # VITS's gin_channels (train_ms.py, configs/vctk_base.json)
SPEAKERS_JSON = "speakers.json"
MIN_PREFIX = 8  # client_ids are 128 hex digits: a prefix this long names one speaker of any real release


def unique_prefixes(client_ids):
    """{client_id: the shortest prefix of at least MIN_PREFIX characters that no other id shares}."""
    ids = sorted(set(client_ids))
    length = MIN_PREFIX
    while len({i[:length] for i in ids}) < len(ids):
        length += 1
    return {i: i[:length] for i in ids}


def read_labels(data_dir):
    """(path, {file: client_id}) of data_dir's speakers.csv; the labels are None when there is none."""
    path = os.path.join(data_dir, speech.SPEAKERS_FILE)
    try:
        return path, speech.read_speaker_labels(path)
    except speech.MetadataError as err:
        raise run_errors.TrainingError(str(err)) from None


def choose_speakers(clipset, data_dir, choice, min_clips, sampling_rate):
    """(the clips to train on, each with its speaker id; the speaker table, or None for a pooled voice).

    Ids go by usable clips, most first (ties by client_id), so id 0 is the speaker with the most clips.
    """
    if choice == "pooled":
        return clipset, None
    path, labels = read_labels(data_dir)
    if labels is None:
        raise run_errors.TrainingError(f"{path}: not found: --speakers {choice} needs each clip's speaker (prepare "
                                       "the data with prepare_data.py from a Common Voice release or dataset with "
                                       "client_id), or train one voice with --speakers pooled")
    clip_speakers = [labels.get(name, "") for name in clipset.names]
    counts = Counter(s for s in clip_speakers if s)
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    if choice == "all":
        chosen = [s for s in ranked if counts[s] >= min_clips]
        if not chosen:
            raise run_errors.TrainingError(f"--speakers all: no speaker of {data_dir} has {min_clips} usable clips "
                                           f"(the most: {counts[ranked[0]] if ranked else 0}); lower "
                                           "--min_speaker_clips or use --speakers pooled")
    else:
        if choice > len(ranked):
            raise run_errors.TrainingError(f"--speakers {choice}: {data_dir} has only {len(ranked)} speakers with "
                                           "usable clips")
        chosen = ranked[:choice]
    ids = {s: k for k, s in enumerate(chosen)}
    keep = [i for i, s in enumerate(clip_speakers) if s in ids]
    chosen_set = clipset.subset(keep)
    chosen_set.speaker_ids = [ids[clip_speakers[i]] for i in keep]
    seconds = Counter()
    for i in keep:
        seconds[clip_speakers[i]] += len(clipset.audio[i]) / sampling_rate
    prefix = unique_prefixes(set(labels.values()) - {""})  # unique among all the data's speakers
    table = [dict(id=ids[s], client_id=prefix[s], clips=counts[s], hours=round(seconds[s] / 3600, 4))
             for s in chosen]
    shown = ", ".join(f"{t['id']}: {t['client_id']} {t['clips']} clips" for t in table[:5])
    print(f"speakers: {len(chosen)} of {len(ranked)} ({shown}{', ...' if len(table) > 5 else ''}); "
          f"{len(clipset) - len(keep)} clips of other or unknown speakers left out")
    return chosen_set, table


def with_speakers(model, count):
    """The voice with `count` speakers. A single-speaker voice gains a speaker embedding and conditioning
    layers where VITS has them (posterior encoder, flow, duration predictor, decoder), all starting where
    they change nothing: every embedding and every new bias exactly zero, so each speaker speaks exactly as
    the pretrained voice until training moves them. The new layers' weights keep their random start: weight
    norm divides by the norm of its vector, and a zero vector would make that 0/0."""
    if model.config.num_speakers > 1 and count != model.config.num_speakers:
        asked = f"--speakers {count}" if count else "--speakers pooled"
        raise run_errors.TrainingError(f"the model already has {model.config.num_speakers} speakers, {asked} does not "
                                       f"fit it: train it with --speakers {model.config.num_speakers}, tune one speaker "
                                       "with train_feedback.py --speaker_id, or start from the single-speaker voice")
    if count < 2 or model.config.num_speakers == count:
        return model
    config = copy.deepcopy(model.config)
    config.num_speakers, config.speaker_embedding_size = count, EMBEDDING_SIZE
    voice = VitsModel(config)
    missing, unexpected = voice.load_state_dict(model.state_dict(), strict=False)
    if unexpected:
        raise run_errors.TrainingError(f"the model's weights do not fit a multi-speaker voice ({unexpected[0]})")
    new = dict(voice.named_parameters())
    with torch.no_grad():
        for name in missing:
            if name == "embed_speaker.weight" or name.endswith(".bias"):
                new[name].zero_()
    return voice.train(model.training)


def is_speaker_part(name):
    """True for the parameters with_speakers adds: the speaker embedding and the conditioning layers."""
    return (name.startswith(("embed_speaker.", "decoder.cond.", "duration_predictor.cond."))
            or ".cond_layer." in name)


def speaker_learning_rate(args, model, table):
    """The peak learning rate of the speaker parts with_speakers is about to add (None when it adds none):
    --speaker_lr, by default ten times --lr (2e-4 with the default --lr: the rate VITS trains at from
    scratch, for the parts that start from scratch). At --lr the embeddings would creep out of zero far
    slower than the rest of the voice adapts, and the speakers stay one average voice for most of a night."""
    if model.config.num_speakers > 1 or len(table or []) < 2:
        return None
    return args.speaker_lr or 10 * args.lr


def write_table(out_dir, table):
    with open(os.path.join(out_dir, SPEAKERS_JSON), "w", encoding="utf-8") as f:
        json.dump(dict(speakers=table), f, indent=1)


def read_table(model_dir):
    """The speakers.json table of an exported voice, or None (a single voice, or a Hub name)."""
    path = os.path.join(model_dir, SPEAKERS_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)["speakers"]
        for row in table:
            int(row["id"]), str(row["client_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise run_errors.TrainingError(f"{path}: not a speaker table ({err})") from None
    return table


def feedback_speaker(config, table, speaker_id):
    """Whose voice a feedback run tunes and speaks with: --speaker_id, or (None) the speaker with the most
    clips; None for a single-speaker voice. One line when the id is outside the model."""
    count = config.num_speakers
    if speaker_id is None:
        return None if count < 2 else max(table or [dict(id=0, clips=0)], key=lambda row: row["clips"])["id"]
    if count < 2:
        if speaker_id:
            raise run_errors.TrainingError(f"--speaker_id {speaker_id}: the model has one speaker")
        return None
    if not 0 <= speaker_id < count:
        raise run_errors.TrainingError(f"--speaker_id {speaker_id}: the model's speakers are 0 to {count - 1}")
    return speaker_id


def label_replay(clipset, data_dir, model, table):
    """The replayed training clips of a multi-speaker voice, each with the id its speaker has in the voice
    (speakers.json names them by client_id prefix); clips of speakers the voice does not have are left out."""
    if model.config.num_speakers < 2 or clipset is None:
        return clipset
    path, labels = read_labels(data_dir)
    if labels is None or table is None:
        missing = path if labels is None else f"{SPEAKERS_JSON} beside --model"
        raise run_errors.TrainingError(f"{missing}: not found: replaying and validating on the training clips "
                                       f"of a {model.config.num_speakers}-speaker voice needs each clip's speaker "
                                       "(give the --data_dir and --model train_vits.py --speakers made)")
    ids = [next((row["id"] for row in table if labels.get(name, "").startswith(row["client_id"])), None)
           for name in clipset.names]
    keep = [i for i, k in enumerate(ids) if k is not None]
    labelled = clipset.subset(keep)
    labelled.speaker_ids = [ids[i] for i in keep]
    if len(keep) < len(clipset):
        print(f"replay: {len(clipset) - len(keep)} clips of speakers the voice does not have are left out")
    return labelled
