"""Stage 2: the en label of every concept spoken by 8 espeak-ng voice variants (22,050 Hz mono WAV)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codebridge.data.emoji.concepts import Concept


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice+variant, unique across VOICES
    speed: int  # words per minute (-s)
    pitch: int  # 0-99 (-p)


# Accents, variants (male/female timbres), speeds and pitches all differ; the last two voices are held out.
VOICES = (
    Voice("en-us+m3", 140, 40),
    Voice("en-us+f3", 160, 60),
    Voice("en-gb+m1", 150, 50),
    Voice("en-gb+f2", 170, 70),
    Voice("en-us+m7", 125, 30),
    Voice("en-gb-scotland+f4", 145, 65),
    Voice("en-us+m5", 135, 45),
    Voice("en-gb+f1", 165, 75),
)
TEST_VOICES = 2


def espeak_version() -> str:
    """The espeak-ng release, recorded in the manifest because the audio bytes depend on it."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].replace("eSpeak NG text-to-speech:", "").strip()


def speak(job: tuple[str, str, int, int, str]) -> None:
    """Worker: ``espeak-ng -v VOICE -s SPEED -p PITCH -w DST`` with the text on stdin (never parsed as options)."""
    text, voice, speed, pitch, dst = job
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", dst]
    proc = subprocess.run(cmd, input=text, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(dst).is_file():
        raise RuntimeError(f"`{' '.join(cmd)}` failed for {text!r} (exit {proc.returncode}): {proc.stderr.strip()}")


def plan_speech(
    concepts: list[Concept], out: Path
) -> tuple[list[dict[str, Any]], list[tuple[str, str, int, int, str]]]:
    """speech.jsonl rows (voice-major, CLDR order) and the espeak-ng jobs that write them."""
    rows, jobs = [], []
    for index, voice in enumerate(VOICES):
        (out / "speech" / f"v{index}").mkdir(parents=True, exist_ok=True)
        for concept in concepts:
            rel = f"speech/v{index}/{Path(concept.art[0].image).stem}.wav"
            row = {"concept": concept.id, "voice": voice.name, "speed": voice.speed, "pitch": voice.pitch}
            rows.append({**row, "text": concept.name, "file": rel})
            jobs.append((concept.name, voice.name, voice.speed, voice.pitch, str(out / rel)))
    return rows, jobs
