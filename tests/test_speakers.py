"""Many voices from Common Voice: speakers kept by prepare_data.py, chosen by train_vits.py --speakers, a
multi-speaker voice that starts as exactly the pretrained one and is conditioned where VITS conditions it,
speakers.json beside the export, and train_feedback.py --speaker_id."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import pipeline

from voicetune.feedback import listening
from voicetune.night import clip_data
from voicetune.night import loop
from voicetune.night import objective
from voicetune.voice import models
import prepare_data
from voicetune.common import run_errors
from voicetune.common import speech
from voicetune.voice import speakers
import train_feedback
import train_vits
from voicetune.night import training_flags
from voicetune.night import vits_trainer
from voicetune.voice import voice_quality
from examples.make_release import client_id, make_release
from conftest import ROOT

# make_release(24) speaks its clips with 4 speakers: 10, 6, 6 and 2 clips.
CLIPS_OF = {client_id(0): 10, client_id(1): 6, client_id(2): 6, client_id(3): 2}


@pytest.fixture(scope="module")
def four_speakers(tiny_model_dir, tmp_path_factory):
    """prepare_data.py output of a 24-clip Common Voice release spoken by four espeak-ng speakers."""
    release = make_release(str(tmp_path_factory.mktemp("release4")), 24, seed=0, workers=1)
    out = str(tmp_path_factory.mktemp("prepared4"))
    prepare_data.main(["--input", release, "--model", tiny_model_dir, "--output_dir", out, "--workers", "1"])
    return out


@pytest.fixture(scope="module")
def four_clipset(four_speakers, tiny_model_dir, tmp_path_factory):
    _, tokenizer = models.load_voice(tiny_model_dir)
    clips, _ = clip_data.load_clips(four_speakers, 16000, str(tmp_path_factory.mktemp("cache4")), 1)
    return clip_data.ClipSet(clips, tokenizer)


def ranked_ids():
    return sorted(CLIPS_OF, key=lambda s: (-CLIPS_OF[s], s))


def test_prepare_data_keeps_every_clip_speaker_beside_metadata(four_speakers, tiny_model_dir, tmp_path):
    labels = speech.read_speaker_labels(os.path.join(four_speakers, "speakers.csv"))
    names = [name for name, _ in speech.read_metadata(os.path.join(four_speakers, "metadata.csv"))]
    assert sorted(labels) == sorted(names)  # one label per kept clip, metadata.csv keeps its two columns
    counts = {s: list(labels.values()).count(s) for s in set(labels.values())}
    assert counts == CLIPS_OF
    # An LJSpeech folder of the prepared clips keeps them; one without speakers.csv leaves none behind.
    again = str(tmp_path / "again")
    prepare_data.main(["--input", four_speakers, "--model", tiny_model_dir, "--output_dir", again, "--workers", "1"])
    assert speech.read_speaker_labels(os.path.join(again, "speakers.csv")) == labels
    plain = str(tmp_path / "plain")
    shutil.copytree(four_speakers, plain, ignore=shutil.ignore_patterns("speakers.csv", "prepare_*"))
    prepare_data.main(["--input", plain, "--model", tiny_model_dir, "--output_dir", again, "--workers", "1"])
    assert not os.path.exists(os.path.join(again, "speakers.csv"))


def test_speakers_n_takes_the_speakers_with_most_clips_most_first(four_clipset, four_speakers, capsys):
    chosen, table = speakers.choose_speakers(four_clipset, four_speakers, 3, 1, 16000)
    top = ranked_ids()[:3]
    assert [row["client_id"] for row in table] == [s[:8] for s in top]
    assert [row["clips"] for row in table] == [10, 6, 6]
    assert [row["id"] for row in table] == [0, 1, 2]
    labels = speech.read_speaker_labels(os.path.join(four_speakers, "speakers.csv"))
    assert len(chosen) == 22
    assert chosen.speaker_ids == [top.index(labels[name]) for name in chosen.names]
    assert "2 clips of other or unknown speakers left out" in capsys.readouterr().out
    # The hours are the clips' own audio.
    seconds = sum(len(a) for a, n in zip(four_clipset.audio, four_clipset.names) if labels[n] == top[0]) / 16000
    assert table[0]["hours"] == round(seconds / 3600, 4)
    # all: every speaker with at least --min_speaker_clips clips; the held-out split keeps each clip's speaker.
    chosen, table = speakers.choose_speakers(four_clipset, four_speakers, "all", 6, 16000)
    assert len(table) == 3
    train, val = clip_data.split_validation(chosen, 2)
    for part in (train, val):
        assert part.speaker_ids == [top.index(labels[name]) for name in part.names]
    batch = clip_data.collate([(val, 0), (val, 1)], 32)
    assert batch["speaker_ids"].tolist() == val.speaker_ids[:2]
    pooled, no_table = speakers.choose_speakers(four_clipset, four_speakers, "pooled", 50, 16000)
    assert pooled is four_clipset and no_table is None
    assert "speaker_ids" not in clip_data.collate([(pooled, 0)], 32)


def test_speaker_choices_that_cannot_be_met_are_refused_in_one_line(four_clipset, four_speakers, tmp_path):
    with pytest.raises(run_errors.TrainingError, match="has only 4 speakers"):
        speakers.choose_speakers(four_clipset, four_speakers, 5, 1, 16000)
    with pytest.raises(run_errors.TrainingError, match="no speaker .* has 11 usable clips"):
        speakers.choose_speakers(four_clipset, four_speakers, "all", 11, 16000)
    with pytest.raises(run_errors.TrainingError, match="speakers.csv: not found"):
        speakers.choose_speakers(four_clipset, str(tmp_path), 2, 1, 16000)
    assert speakers.unique_prefixes(["abcdefgh12", "abcdefgh34", "zz"]) == {
        "abcdefgh12": "abcdefgh1", "abcdefgh34": "abcdefgh3", "zz": "zz"}


def speaker_batch(clipset, ids):
    batch = clip_data.collate([(clipset, i) for i in range(len(ids))], 32)
    batch["speaker_ids"] = torch.tensor(ids)
    return batch


def test_before_any_step_every_speaker_is_exactly_the_pretrained_voice(tiny_model_dir, tiny_clips):
    base, tokenizer = models.load_voice(tiny_model_dir)
    voice = speakers.with_speakers(base, 3)
    assert voice.config.num_speakers == 3 and voice.config.speaker_embedding_size == 256
    ids = torch.tensor([speech.token_ids(tokenizer, "Ez bi kurdî diaxivim.")])
    base.eval(), voice.eval()
    for k in range(3):
        torch.manual_seed(7)
        pretrained = base(input_ids=ids).waveform
        torch.manual_seed(7)
        assert torch.equal(voice(input_ids=ids, speaker_id=k).waveform, pretrained)
    # The training direction too: our step with speakers gives the pretrained voice's losses exactly.
    base.train(), voice.train()
    batch = speaker_batch(tiny_clips, [0, 1, 2])
    torch.manual_seed(3)
    pooled = objective.generator_forward(base, {k: v for k, v in batch.items() if k != "speaker_ids"}, 16)
    torch.manual_seed(3)
    multi = objective.generator_forward(voice, batch, 16)
    for key in ("audio_hat", "loss_kl", "loss_dur"):
        assert torch.equal(multi[key], pooled[key]), key


def test_the_step_conditions_where_vits_does_and_the_speakers_learn_apart(tiny_model_dir, tiny_clips):
    voice = speakers.with_speakers(models.load_voice(tiny_model_dir)[0], 2).train()
    with torch.no_grad():
        voice.embed_speaker.weight.normal_()
    seen = {}
    # Where the speaker embedding goes in, and at which argument: VITS's enc_q(y, g), flow(z, g), dec(z, g)
    # and, through its own cond layer, the duration predictor.
    parts = dict(posterior=(voice.posterior_encoder, 2), flow=(voice.flow, 2), decoder=(voice.decoder, 1),
                 durations=(voice.duration_predictor.cond, 0))

    def keep(name, at):
        def hook(module, args):
            seen.setdefault(name, args[at])
        return hook

    for name, (module, at) in parts.items():
        module.register_forward_pre_hook(keep(name, at))
    batch = speaker_batch(tiny_clips, [1, 0])
    objective.generator_forward(voice, batch, 16)
    expected = voice.embed_speaker(batch["speaker_ids"]).unsqueeze(-1)
    for name in parts:
        assert name in seen and torch.equal(seen[name], expected), name
    # VITS detaches g for the duration predictor only: its loss must not move the speaker embeddings.
    assert not seen["durations"].requires_grad
    assert seen["decoder"].requires_grad and seen["posterior"].requires_grad and seen["flow"].requires_grad

    # From the zero start, one step moves each speaker's embedding its own way, and nothing becomes NaN.
    voice = speakers.with_speakers(models.load_voice(tiny_model_dir)[0], 2).train()
    opt = torch.optim.AdamW(voice.parameters(), lr=1e-3)
    out = objective.generator_forward(voice, speaker_batch(tiny_clips, [0, 1]), 16)
    (objective.mel_slice_loss(out, 16000) + out["loss_kl"] + out["loss_dur"]).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in voice.parameters())
    emb = voice.embed_speaker.weight.detach()
    assert emb[0].abs().sum() > 0 and emb[1].abs().sum() > 0 and not torch.equal(emb[0], emb[1])


def run_train(data, model, out, *extra):
    return train_vits.main(["--model", model, "--data_dir", data, "--output_dir", out, "--device", "cpu",
                            "--batch_size", "4", "--grad_accum", "1", "--disc_channels", "64", "--eval_clips", "2",
                            "--d_warmup_steps", "0", "--num_workers", "1", "--val_size", "2", *extra])


@pytest.fixture(scope="module")
def three_speaker_run(four_speakers, tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run3"))
    assert run_train(four_speakers, tiny_model_dir, out, "--speakers", "3", "--epochs", "2", "--lr", "2e-3") == 0
    return out


def test_a_three_speaker_voice_loads_in_pipeline_and_names_its_speakers(three_speaker_run, tmp_path):
    final = os.path.join(three_speaker_run, "final_model")
    with open(os.path.join(final, "speakers.json"), encoding="utf-8") as f:
        table = json.load(f)["speakers"]
    assert [(row["id"], row["client_id"], row["clips"]) for row in table] == [
        (k, s[:8], CLIPS_OF[s]) for k, s in enumerate(ranked_ids()[:3])]
    with open(os.path.join(final, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_speakers"] == 3
    speak = pipeline("text-to-speech", model=final)
    torch.manual_seed(0)
    waves = [speak("Ez bi kurdî diaxivim.", forward_params={"speaker_id": k})["audio"] for k in range(3)]
    # After training the speakers sound different (here: differ in length or samples).
    assert any(a.shape != waves[0].shape or not np.allclose(a, waves[0]) for a in waves[1:])
    samples = os.path.join(three_speaker_run, "samples", "epoch_2")
    assert sorted(os.listdir(samples)) == ["speaker_0", "speaker_1", "speaker_2"]
    # Each speaker's listening sample is that speaker of the final voice (the same noise).
    model, tokenizer = models.load_voice(final)
    for k in range(3):
        direct = voice_quality.synthesise(model, tokenizer, [voice_quality.DEFAULT_SENTENCES[0]],
                                          str(tmp_path / str(k)), speaker_id=k)[0]
        sample = sf_read(os.path.join(samples, f"speaker_{k}", "00.wav")).astype(np.int32)
        assert len(sample) == len(sf_read(direct)) and np.abs(sample - sf_read(direct)).max() <= 1
    with open(os.path.join(three_speaker_run, "metrics.jsonl"), encoding="utf-8") as f:
        record = [json.loads(line) for line in f if "val_mel" in line][-1]
    assert any(key.startswith("eval_mcd_speaker_") for key in record)
    assert os.path.isfile(os.path.join(three_speaker_run, "checkpoints", "best_model", "speakers.json"))


def test_resuming_with_other_speakers_or_relabelled_clips_is_refused(three_speaker_run, four_speakers, tmp_path,
                                                                     tiny_model_dir, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(three_speaker_run, run)
    assert run_train(four_speakers, tiny_model_dir, run, "--speakers", "2", "--epochs", "3", "--lr", "2e-3",
                     "--resume") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--speakers 2 (the run has 3)" in errors[0]
    data = str(tmp_path / "data")
    shutil.copytree(four_speakers, data)
    labels = speech.read_speaker_labels(os.path.join(data, "speakers.csv"))
    first, second = ranked_ids()[1:3]  # two clips change speaker: the same counts, other labels
    a = next(n for n, s in labels.items() if s == first)
    b = next(n for n, s in labels.items() if s == second)
    labels[a], labels[b] = second, first
    speech.write_speaker_labels(os.path.join(data, "speakers.csv"), sorted(labels.items()))
    assert run_train(data, tiny_model_dir, run, "--speakers", "3", "--epochs", "3", "--lr", "2e-3", "--resume") == 2
    assert "trained on other data (metadata.csv, speakers.csv" in capsys.readouterr().err


def test_feedback_trains_the_chosen_speaker_and_keeps_all(three_speaker_run, four_speakers, tmp_path, monkeypatch):
    final = os.path.join(three_speaker_run, "final_model")
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    for name, text in speech.read_metadata(os.path.join(four_speakers, "metadata.csv"))[:4]:
        shutil.copy(os.path.join(four_speakers, "wavs", name), feedback / name)
        (feedback / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    out = str(tmp_path / "tuned")
    seen = []
    real_fit = loop.fit

    def fit(trainer, tokenizer, train_sets, *args, **kwargs):
        seen.extend((cs.names, cs.speaker_ids) for cs in train_sets)
        return real_fit(trainer, tokenizer, train_sets, *args, **kwargs)

    monkeypatch.setattr(loop, "fit", fit)
    flags = ["--model", final, "--feedback_dir", str(feedback), "--data_dir", four_speakers, "--device", "cpu",
             "--batch_size", "2", "--grad_accum", "1", "--max_steps", "2", "--eval_clips", "0", "--num_workers", "1",
             "--feedback_weight", "1", "--replay_ratio", "0.5"]
    assert train_feedback.main(flags + ["--output_dir", str(tmp_path / "bad"), "--speaker_id", "3"]) == 2
    assert train_feedback.main(flags + ["--output_dir", out, "--speaker_id", "2"]) == 0
    labels = speech.read_speaker_labels(os.path.join(four_speakers, "speakers.csv"))
    top = ranked_ids()[:3]
    feedback_set, replay_set = seen
    assert set(feedback_set[1]) == {2}
    assert replay_set[1] == [top.index(labels[n]) for n in replay_set[0]]  # replayed clips keep their speakers
    tuned = os.path.join(out, "final_model")
    assert models.load_voice(tuned)[0].config.num_speakers == 3
    assert speakers.read_table(tuned) == speakers.read_table(final)


def test_train_vits_help_says_how_the_speaker_choices_differ(capsys):
    with pytest.raises(SystemExit):
        train_vits.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--speakers pooled|N|all" in out and "--top_speakers" in out and "--min_speaker_clips" in out


def test_the_new_speaker_parts_learn_at_their_own_rate(tiny_model_dir):
    base = models.load_voice(tiny_model_dir)[0]
    args = training_flags.parse(["--speakers", "2", "--lr", "1e-4", "--warmup_steps", "0"])
    assert speakers.speaker_learning_rate(args, base, [dict(id=0), dict(id=1)]) == pytest.approx(1e-3)
    assert speakers.speaker_learning_rate(training_flags.parse(["--speaker_lr", "3e-3"]), base,
                                          [dict(id=0), dict(id=1)]) == 3e-3
    assert speakers.speaker_learning_rate(args, base, None) is None  # pooled: nothing new
    voice = speakers.with_speakers(base, 2)
    added = {name for name, _ in voice.named_parameters()} - {name for name, _ in base.named_parameters()}
    trainer = vits_trainer.VitsTrainer(models.prepare_for_training(voice), models.VitsDiscriminator(max_channels=64),
                                       args, torch.device("cpu"), "fp32", speaker_lr=1e-3)
    trainer.schedule(10)
    params = {id(p): name for name, p in voice.named_parameters()}
    groups = [({params[id(p)] for p in group["params"]}, group["lr"]) for group in trainer.opt_g.param_groups]
    assert groups[1] == (added, pytest.approx(1e-3)) and groups[0][1] == pytest.approx(1e-4)
    assert not groups[0][0] & added


def test_a_listening_session_speaks_again_when_the_speaker_changes(three_speaker_run, tmp_path):
    final = os.path.join(three_speaker_run, "final_model")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Roj baş, tu çawa yî?\nEz bi kurdî diaxivim.\n", encoding="utf-8")
    kit = str(tmp_path / "kit")
    flags = ["--model", final, "--device", "cpu", "--feedback_dir", str(tmp_path / "feedback")]
    assert train_feedback.main(["--make_session", str(sentences), "--output_dir", kit, "--speaker_id", "1"]
                               + flags) == 0
    with open(os.path.join(kit, "README.txt"), encoding="utf-8") as f:
        assert "--speaker_id 1" in f.read()
    spoken = {f: sf_read(os.path.join(kit, "model", f)) for f in ("s001.wav", "s002.wav")}
    session = listening.open_session(kit, train_feedback.parse_args(["--listen", kit, "--speaker_id", "1"] + flags))
    assert session.speaker_id == 1 and "--speaker_id 1" in session.state()["command"]
    assert all(np.array_equal(sf_read(os.path.join(kit, "model", f)), a) for f, a in spoken.items())
    # Speaker 2 speaks every sentence again, as speaker 2 speaks it with the page's fixed noise.
    session = listening.open_session(kit, train_feedback.parse_args(["--listen", kit, "--speaker_id", "2"] + flags))
    model, tokenizer = models.load_voice(final)
    expected = voice_quality.synthesise(model, tokenizer, ["Roj baş, tu çawa yî?"], str(tmp_path / "direct"),
                                        speaker_id=2)[0]
    assert np.array_equal(sf_read(os.path.join(kit, "model", "s001.wav")), sf_read(expected))
    assert not np.array_equal(sf_read(os.path.join(kit, "model", "s001.wav")), spoken["s001.wav"])
    with open(os.path.join(kit, "session.json"), encoding="utf-8") as f:
        assert json.load(f)["speaker_id"] == 2
    with pytest.raises(run_errors.TrainingError, match="--speaker_id 3: the model's speakers are 0 to 2"):
        listening.open_session(kit, train_feedback.parse_args(["--listen", kit, "--speaker_id", "3"] + flags))


def sf_read(path):
    return sf.read(path, dtype="int16")[0]


def test_each_held_out_clip_is_spoken_by_its_own_speaker(tiny_model_dir, tiny_clips):
    voice = speakers.with_speakers(models.load_voice(tiny_model_dir)[0], 2)
    with torch.no_grad():
        voice.embed_speaker.weight.normal_(std=3.0)
    two = tiny_clips.subset([0, 1])
    scores = [voice_quality.evaluate_quality(voice, two.with_speaker(k), 2) for k in (0, 1)]
    assert scores[0]["mcd"] != scores[1]["mcd"]
    assert scores[1]["mcd_speaker_1"] == pytest.approx(scores[1]["mcd"]) and "mcd_speaker_0" not in scores[1]
    # The default speaker of a feedback run is the one with the most clips; a single voice has none.
    table = [dict(id=0, clips=5), dict(id=1, clips=9), dict(id=2, clips=9)]
    assert speakers.feedback_speaker(voice.config, table, None) == 1
    assert speakers.feedback_speaker(voice.config, table, 0) == 0
    assert speakers.feedback_speaker(models.load_voice(tiny_model_dir)[0].config, None, None) is None


def test_a_multi_speaker_run_resumes_exactly(three_speaker_run, four_speakers, tiny_model_dir, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints"))
    epoch1 = os.path.join(run, "checkpoints", "checkpoint_epoch_1.pt")
    shutil.copy(os.path.join(three_speaker_run, "checkpoints", "checkpoint_epoch_1.pt"), epoch1)
    assert run_train(four_speakers, tiny_model_dir, run, "--speakers", "3", "--epochs", "2", "--lr", "2e-3",
                     "--resume", epoch1) == 0
    straight = models.load_voice(os.path.join(three_speaker_run, "final_model"))[0].state_dict()
    resumed = models.load_voice(os.path.join(run, "final_model"))[0].state_dict()
    assert straight.keys() == resumed.keys() and "embed_speaker.weight" in resumed
    for key, value in straight.items():
        assert torch.allclose(value, resumed[key], atol=1e-6), key
    assert not torch.equal(straight["embed_speaker.weight"][0], straight["embed_speaker.weight"][1])


def test_under_torchrun_every_process_trains_the_same_speakers(four_speakers, tiny_model_dir, tmp_path):
    out, dumps = str(tmp_path / "run"), str(tmp_path / "dumps")
    os.makedirs(dumps)
    args = ["--model", tiny_model_dir, "--data_dir", four_speakers, "--output_dir", out, "--device", "cpu",
            "--batch_size", "2", "--grad_accum", "1", "--disc_channels", "64", "--num_workers", "1", "--epochs", "1",
            "--d_warmup_steps", "0", "--eval_clips", "0", "--val_size", "2", "--speakers", "3"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(ROOT, "tests", "hooked_run.py"), "train_vits"] + args, cwd=ROOT,
                            env=dict(os.environ, TEST_DUMP_DIR=dumps, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(os.path.join(dumps, f"rank{r}.pt"), weights_only=True)["model"] for r in range(2)]
    # The two processes train different clips of different speakers: only averaged gradients keep the
    # speaker embeddings (and the rest) the same on both.
    assert ranks[0].keys() == ranks[1].keys()
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    embeddings = ranks[0]["embed_speaker.weight"]
    assert embeddings.shape == (3, 256) and all(embeddings[k].abs().sum() > 0 for k in range(3))
    assert speakers.read_table(os.path.join(out, "final_model"))[0]["client_id"] == ranked_ids()[0][:8]


def test_speakers_with_as_many_clips_go_by_client_id(tiny_clips, tmp_path):
    names = tiny_clips.names
    labels = [(n, "zz" * 8 if i < 3 else "aa" * 8 if i < 6 else "mm" * 8) for i, n in enumerate(names)]
    speech.write_speaker_labels(str(tmp_path / "speakers.csv"), labels)
    _, table = speakers.choose_speakers(tiny_clips, str(tmp_path), 3, 1, 16000)
    assert [row["client_id"] for row in table] == ["mm" * 4, "aa" * 4, "zz" * 4]
    assert [row["clips"] for row in table] == [len(names) - 6, 3, 3]


def test_a_multi_speaker_model_is_not_trained_as_another_number_of_speakers(tiny_model_dir):
    voice = speakers.with_speakers(models.load_voice(tiny_model_dir)[0], 3)
    assert speakers.with_speakers(voice, 3) is voice
    for count, asked in ((0, "--speakers pooled"), (2, "--speakers 2"), (1, "--speakers 1")):
        with pytest.raises(run_errors.TrainingError, match=f"already has 3 speakers, {asked} does not fit"):
            speakers.with_speakers(voice, count)


def test_replaying_a_multi_speaker_voice_needs_the_clips_speakers(tiny_model_dir, tiny_clips, tmp_path):
    voice = speakers.with_speakers(models.load_voice(tiny_model_dir)[0], 2)
    table = [dict(id=0, client_id="aa" * 4, clips=1), dict(id=1, client_id="bb" * 4, clips=1)]
    with pytest.raises(run_errors.TrainingError, match="speakers.csv: not found: replaying and validating"):
        speakers.label_replay(tiny_clips, str(tmp_path), voice, table)
    speech.write_speaker_labels(str(tmp_path / "speakers.csv"),
                                [(n, ("bb" * 40) if i % 3 else "zz" * 40) for i, n in enumerate(tiny_clips.names)])
    with pytest.raises(run_errors.TrainingError, match="speakers.json beside --model: not found"):
        speakers.label_replay(tiny_clips, str(tmp_path), voice, None)
    labelled = speakers.label_replay(tiny_clips, str(tmp_path), voice, table)
    assert labelled.names == [n for i, n in enumerate(tiny_clips.names) if i % 3]  # "zz..." is not in the voice
    assert labelled.speaker_ids == [1] * len(labelled)
    assert speakers.label_replay(tiny_clips, str(tmp_path), models.load_voice(tiny_model_dir)[0], None) is tiny_clips
