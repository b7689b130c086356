"""What prepare_data.py writes: each chosen clip decoded into a 16 kHz WAV by a pool of processes, the cache
that lets a re-run decode only what is new, metadata.csv and speakers.csv, and the report.

decode_clip is the pool's worker, at module level so that spawned workers (Windows) can unpickle it.
"""

import json
import os
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import NamedTuple

import librosa
import numpy as np
from tqdm import tqdm

from voicetune.common import run_errors
from voicetune.common import run_folder
from voicetune.common import speech
from voicetune.data import selection
from voicetune.data import sources

# Bump when decoding or trimming changes, so caches made by older code are not trusted.
AUDIO_VERSION = 1
REPORT_NAME = "prepare_report.json"
CACHE_NAME = "prepare_cache.json"
CACHE_EVERY = 2000  # clips between cache saves, so a killed run loses little work


class Decoding(NamedTuple):
    outcomes: dict  # clip name: (trimmed samples or None, reason it is dropped or None, detail)
    decoded: int  # clips decoded by this run
    reused: int  # clips an earlier run's cache settled
    seconds: float  # spent decoding


def make_wavs(args, source, clips, tokenizer):
    """Settle every clip: from what an earlier run with the same audio settings measured, else by decoding it
    (and writing its WAV if it is kept) in parallel. The cache is saved also when interrupted, so the clips
    decoded so far are not decoded again."""
    tokens = {clip.name: len(speech.token_ids(tokenizer, clip.text)) for clip in clips}
    wavs_dir = os.path.join(args.output_dir, "wavs")
    os.makedirs(wavs_dir, exist_ok=True)
    settings = audio_settings(args)
    cache = load_cache(args.output_dir, settings)
    limits = selection.limits(args)
    outcomes, to_decode = reuse_earlier_work(source, clips, cache, tokens, limits, wavs_dir)
    reused = sum(reason != "missing_file" for _, reason, _ in outcomes.values())
    start = time.time()

    def save_cache():
        write_json(os.path.join(args.output_dir, CACHE_NAME), {"settings": settings, "clips": cache})

    try:
        decode_all(args, source, to_decode, tokens, limits, wavs_dir, outcomes, cache, save_cache)
    finally:
        save_cache()
    return Decoding(outcomes, len(to_decode), reused, time.time() - start)


def decode_clip(job):
    """Worker: decode, check and (if kept) write one clip; returns (job id, trimmed samples, reason, detail)."""
    job_id, source, out_path, n_tokens, n_chars, limits, trim, top_db = job
    if source is None:
        return job_id, None, "missing_file", "no such clip in the input"
    try:
        audio = speech.load_audio(source, speech.SAMPLE_RATE, trim=trim, top_db=top_db)
        if speech.is_silent(audio):
            return job_id, None, "silent", f"no sound above {speech.SILENCE_DBFS:.0f} dBFS"
        reason = selection.audio_verdict(len(audio), n_tokens, n_chars, limits)
        if reason is None:
            try:
                speech.write_wav(out_path, audio, speech.SAMPLE_RATE)
            except OSError as err:  # our own output, not the clip, is at fault: the run must stop
                return job_id, None, "write_error", f"cannot write {out_path}: {err.strerror or err}"
        return job_id, len(audio), reason, None
    except speech.AudioError as err:
        return job_id, None, err.reason, str(err)
    except Exception as err:  # one odd clip must never take the whole run down
        return job_id, None, "decode_error", f"{type(err).__name__}: {err}"


def run_jobs(jobs, workers, total):
    """Yield decode_clip results as they finish, `workers` processes in parallel, with a progress bar."""
    if total == 0:
        return
    with tqdm(total=total, unit="clip", desc="decoding", dynamic_ncols=True) as bar:
        if workers <= 1:
            for job in jobs:
                yield decode_clip(job)
                bar.update()
            return
        # librosa imports its resampler lazily (~2 s); doing it once here lets forked workers inherit it.
        librosa.resample(np.zeros(64, dtype=np.float32), orig_sr=32000, target_sr=speech.SAMPLE_RATE)
        with ProcessPoolExecutor(max_workers=workers, **run_folder.worker_setup()) as pool:
            pending = set()
            for job in jobs:
                # Bounded queue: a tarball's clips are read only as fast as they are decoded.
                if len(pending) >= workers * 8:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
                        bar.update()
                pending.add(pool.submit(decode_clip, job))
            for future in wait(pending).done:
                yield future.result()
                bar.update()


def reuse_earlier_work(source, candidates, cache, tokens, limits, wavs_dir):
    """Settle every clip the cache already knows; return ({name: (samples, reason, detail)}, clips to decode)."""
    outcomes, to_decode = {}, []
    for clip in candidates:
        signature = sources.clip_signature(source, clip)
        if signature is None:
            outcomes[clip.name] = (None, "missing_file", "file not found")
            continue
        fact = cache.get(clip.name)
        if fact and fact["source"] == signature:
            if "error" in fact:
                outcomes[clip.name] = (None, fact["error"], fact.get("detail"))
                continue
            verdict = selection.audio_verdict(fact["samples"], tokens[clip.name], len(clip.text), limits)
            wav = os.path.join(wavs_dir, clip.name)
            # A kept clip is reused only if its WAV is the complete one this cache entry describes.
            if verdict or os.path.isfile(wav) and os.path.getsize(wav) == fact["wav_bytes"]:
                outcomes[clip.name] = (fact["samples"], verdict, None)
                continue
        to_decode.append(clip)
    return outcomes, to_decode


def decode_all(args, source, clips, tokens, limits, wavs_dir, outcomes, cache, save_cache):
    """Decode `clips` in parallel, filling `outcomes` and recording what each measured in `cache`."""
    by_name = {clip.name: clip for clip in clips}
    jobs = ((clip.name, audio, os.path.join(wavs_dir, clip.name), tokens[clip.name], len(clip.text), limits,
             not args.no_trim, args.trim_db) for clip, audio in sources.clip_audio(source, clips))
    results = run_jobs(jobs, args.workers, len(clips))
    for done, (name, samples, reason, detail) in enumerate(results, 1):
        clip = by_name[name]
        if reason == "write_error":
            raise run_errors.TrainingError(detail)
        outcomes[name] = (samples, reason, detail)
        if detail:
            tqdm.write(f"warning: {clip.source}: {detail}", file=sys.stderr)
        signature = sources.clip_signature(source, clip)
        if samples is not None:
            wav_bytes = os.path.getsize(os.path.join(wavs_dir, name)) if reason is None else None
            cache[name] = {"source": signature, "samples": samples, "wav_bytes": wav_bytes}
        elif reason != "decode_error" and signature is not None:
            cache[name] = {"source": signature, "error": reason, "detail": detail}
        if done % CACHE_EVERY == 0:
            save_cache()


def audio_settings(args):
    return {"version": AUDIO_VERSION, "sample_rate": speech.SAMPLE_RATE, "trim": not args.no_trim,
            "trim_db": args.trim_db}


def load_cache(output_dir, settings):
    """Per-clip audio facts from an earlier run with the same audio settings (else empty)."""
    try:
        with open(os.path.join(output_dir, CACHE_NAME), encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache.get("clips", {}) if cache.get("settings") == settings else {}


def write_json(path, data):
    run_folder.write_atomically(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n", durable=False)


def write_clip_lists(output_dir, kept):
    """speakers.csv and metadata.csv of the kept (clip, samples), in list order; WAVs they do not list go."""
    speakers_csv = os.path.join(output_dir, speech.SPEAKERS_FILE)
    if any(clip.speaker for clip, _ in kept):
        speech.write_speaker_labels(speakers_csv, [(clip.name, clip.speaker) for clip, _ in kept])
    elif os.path.isfile(speakers_csv):
        os.remove(speakers_csv)  # another input's speakers must not label these clips
    speech.write_metadata(os.path.join(output_dir, "metadata.csv"), [(clip.name, clip.text) for clip, _ in kept])
    remove_stale_files(os.path.join(output_dir, "wavs"), {clip.name for clip, _ in kept})


def remove_stale_files(wavs_dir, kept_names):
    """Delete WAVs no longer listed (metadata.csv must match the folder) and temp files of killed runs."""
    run_folder.remove_stale_temps(wavs_dir)
    for name in os.listdir(wavs_dir):
        if name.endswith(".wav") and name not in kept_names:
            os.remove(os.path.join(wavs_dir, name))


def write_report(args, source, kept, counts, dropped_list, decoding):
    """Write prepare_report.json and print its summary; return the report."""
    report = summarise(args, source, kept, counts, decoding)
    report["dropped_list"] = dropped_list
    write_json(os.path.join(args.output_dir, REPORT_NAME), report)
    print_summary(report, args.output_dir)
    return report


def summarise(args, source, kept, counts, decoding):
    dropped, not_selected, repairs = counts
    decoded, reused, elapsed = decoding.decoded, decoding.reused, decoding.seconds
    hours = defaultdict(float)
    clips_per_speaker = Counter()
    for clip, samples in kept:
        hours[clip.speaker or "unknown"] += samples / speech.SAMPLE_RATE / 3600
        clips_per_speaker[clip.speaker or "unknown"] += 1
    speakers = sorted(hours, key=lambda s: (-hours[s], s))
    return {
        "input": os.path.abspath(args.input) if os.path.exists(args.input) else args.input,  # or a Hub id
        "input_kind": source.kind,
        "model": args.model,
        "kept_clips": len(kept),
        "kept_hours": round(sum(hours.values()), 4),
        "dropped_clips": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())),
        "not_selected": dict(sorted(not_selected.items())),
        "text_repairs": dict(sorted(repairs.items())),
        "speakers": len(speakers),
        "hours_per_speaker": {s: round(hours[s], 4) for s in speakers},
        "clips_per_speaker": {s: clips_per_speaker[s] for s in speakers},
        "decoded_clips": decoded,
        "reused_clips": reused,
        "decode_seconds": round(elapsed, 2),
        "clips_per_second": round(decoded / elapsed, 2) if decoded and elapsed > 0 else None,
        "settings": {k: v for k, v in vars(args).items()},
    }


def print_summary(report, output_dir):
    print(f"kept {report['kept_clips']} clips ({report['kept_hours']:.2f} h) in {output_dir}: "
          f"{report['decoded_clips']} decoded"
          + (f" at {report['clips_per_second']:.1f} clips/s" if report["clips_per_second"] else "")
          + f", {report['reused_clips']} known from an earlier run")
    if report["dropped"]:
        print(f"dropped {report['dropped_clips']} clips:")
        for reason, n in report["dropped"].items():
            print(f"  {reason:<20} {n}")
    for reason, n in report["not_selected"].items():
        print(f"not selected ({reason}): {n}")
    if report["text_repairs"]:
        print("texts repaired: " + ", ".join(f"{what} {n}" for what, n in report["text_repairs"].items()))
    speakers = list(report["hours_per_speaker"].items())
    if speakers:
        print(f"hours per speaker (top {min(10, len(speakers))} of {len(speakers)}):")
        for speaker, h in speakers[:10]:
            print(f"  {speaker[:16]:<16} {h:7.3f} h  {report['clips_per_speaker'][speaker]:6d} clips")
    print(f"report: {os.path.join(output_dir, REPORT_NAME)}")

