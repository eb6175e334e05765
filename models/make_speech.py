"""Generate models/speech/speech.npz: real English sentences spoken by espeak-ng, 16 kHz int16.

    .venv/bin/python models/make_speech.py

Run ONCE on a machine with espeak-ng (https://github.com/espeak-ng/espeak-ng); the output file is
committed, so CI machines need neither espeak-ng nor sox. models/corpus_data.py builds the audio
inputs of the speech models (silero-vad, basic-pitch) from it.

Why synthetic speech at all: the corpus needs speech that is real in the sense that matters to a
voice-activity detector (voiced/unvoiced phones, pauses between words, silence around a
sentence), with no licence question and no download. espeak-ng is a formant synthesiser, so it
sounds robotic, but its output has the spectral and temporal structure of speech.

Each sentence is spoken by one of several voices (accents and male/female variants) at one of
several rates, with 0.25-0.5 s of silence before and after it, and a faint white noise floor
(about -76 dBFS) over the whole clip so that the "silences" look like a quiet room rather than
digital zero. Everything is seeded, so a rerun gives the same file.

The file holds:
  audio_<i>   int16 waveform of sentence i at 16 kHz (silence + speech + silence)
  text        the sentences (unicode array), text[i] belongs to audio_<i>
  voice, rate the espeak-ng voice and words-per-minute used for each
  speech_start, speech_end   sample index where the spoken part (the espeak output) begins and ends
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

OUT = Path(__file__).with_name("speech") / "speech.npz"
SR = 16000

# Public-domain prose and verse (all authors died long ago; the texts are on Project Gutenberg).
# Short sentences keep the file small: about 1-6 s of speech each.
SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of a wife.",  # Austen, Pride and Prejudice
    "Call me Ishmael.",  # Melville, Moby-Dick
    "Some years ago, never mind how long precisely, I thought I would sail about a little.",  # Melville, Moby-Dick
    "It was the best of times, it was the worst of times.",  # Dickens, A Tale of Two Cities
    "Alice was beginning to get very tired of sitting by her sister on the bank.",  # Carroll, Alice in Wonderland
    "Curiouser and curiouser, cried Alice.",  # Carroll, Alice in Wonderland
    "Happy families are all alike; every unhappy family is unhappy in its own way.",  # Tolstoy, Anna Karenina (Garnett tr.)
    "The wind was a torrent of darkness among the gusty trees.",  # Noyes, The Highwayman
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",  # Lincoln, Gettysburg Address
    "To be, or not to be, that is the question.",  # Shakespeare, Hamlet
    "All the world's a stage, and all the men and women merely players.",  # Shakespeare, As You Like It
    "Marley was dead, to begin with.",  # Dickens, A Christmas Carol
    "Whether I shall turn out to be the hero of my own life, these pages must show.",  # Dickens, David Copperfield
    "There was no possibility of taking a walk that day.",  # C. Bronte, Jane Eyre
    "In the beginning God created the heaven and the earth.",  # King James Bible, Genesis
    "The studio was filled with the rich odour of roses.",  # Wilde, The Picture of Dorian Gray
    "Mr. Sherlock Holmes, who was usually very late in the mornings, was seated at the breakfast table.",  # Doyle, The Hound of the Baskervilles
    "The time traveller was expounding a recondite matter to us.",  # Wells, The Time Machine
    "No one would have believed in the last years of the nineteenth century that this world was being watched.",  # Wells, The War of the Worlds
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",  # Shakespeare, The Merchant of Venice
    "Tom! No answer. Tom! No answer.",  # Twain, The Adventures of Tom Sawyer
    "The mole had been working very hard all the morning, spring-cleaning his little home.",  # Grahame, The Wind in the Willows
    "All children, except one, grow up.",  # Barrie, Peter Pan
    "I am by birth a Genevese, and my family is one of the most distinguished of that republic.",  # M. Shelley, Frankenstein
    "Tyger Tyger, burning bright, in the forests of the night.",  # Blake, The Tyger
    "Water, water, every where, nor any drop to drink.",  # Coleridge, The Rime of the Ancient Mariner
    "The boy stood on the burning deck, whence all but he had fled.",  # Hemans, Casabianca
    "Hope is the thing with feathers that perches in the soul.",  # Dickinson
    "I wandered lonely as a cloud that floats on high over vales and hills.",  # Wordsworth, Daffodils
    "Fifteen men on the dead man's chest, yo ho ho, and a bottle of rum.",  # Stevenson, Treasure Island
]

# (voice, words per minute); espeak-ng's own voices with its male/female variants.
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp", "en-gb-scotland+f2", "en-029", "en-us+m3", "en-gb+f4"]
RATES = [160, 175, 190, 210]


def speak(text: str, voice: str, rate: int) -> np.ndarray:
    """espeak-ng's 22050 Hz mono WAV on stdout -> float32 at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text],
                         check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, "espeak-ng wrote an unexpected format"
        sr = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    g = np.gcd(SR, sr)
    x = resample_poly(x, SR // g, sr // g).astype(np.float32)
    # espeak pads its output with a little silence of its own; trim it so speech_start/end are
    # where the voice really is (threshold ~ -50 dBFS).
    loud = np.flatnonzero(np.abs(x) > 3e-3)
    return x[loud[0]:loud[-1] + 1] if len(loud) else x


def main() -> None:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed; models/speech/speech.npz is committed, no need to rerun")
    rng = np.random.default_rng(20240611)
    texts = list(SENTENCES)
    arrays, voices, rates, starts, ends = {}, [], [], [], []
    for i, text in enumerate(texts):
        voice, rate = VOICES[i % len(VOICES)], RATES[(i * 3) % len(RATES)]
        speech = speak(text, voice, rate)
        speech *= rng.uniform(0.35, 0.8) / max(np.abs(speech).max(), 1e-6)    # varied loudness
        pre, post = (int(rng.uniform(0.25, 0.5) * SR) for _ in range(2))
        clip = np.concatenate([np.zeros(pre, np.float32), speech, np.zeros(post, np.float32)])
        clip += rng.normal(0.0, 1.5e-4, clip.shape).astype(np.float32)           # quiet-room noise floor
        arrays[f"audio_{i}"] = np.clip(np.round(clip * 32767), -32768, 32767).astype(np.int16)
        voices.append(voice), rates.append(rate), starts.append(pre), ends.append(pre + len(speech))
        print(f"{i:2d} {voice:18s} {rate} wpm {len(clip) / SR:4.1f} s  {text}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, text=np.array(texts), voice=np.array(voices), rate=np.array(rates),
                        speech_start=np.array(starts), speech_end=np.array(ends), sr=np.array(SR), **arrays)
    total = sum(len(a) for a in arrays.values()) / SR
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(texts)} sentences, {total:.0f} s of audio)")


if __name__ == "__main__":
    main()
