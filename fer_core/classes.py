"""Emotion class names: the canonical seven, the aliases other datasets use, and their codes.

Datasets name the same emotion differently (AffectNet's "Anger", RAF-DB's "Sadness", folders
called "surprised"), and two label files can number them differently. Every loader maps a
name through `canonical_class` and a numeric label through one of the code tables below, so a
run trained on one dataset and scored or served on another agrees on what "angry" means.
A name with no known alias is kept as written: any set of class folders works.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# Lower-cased spellings seen in FER datasets (FER2013, FER+, RAF-DB, AffectNet, CK+, JAFFE,
# ExpW) -> the canonical name. "contempt" is an eighth class in FER+, AffectNet and CK+.
CLASS_ALIASES: dict[str, str] = {
    "anger": "angry", "angry": "angry", "mad": "angry",
    "disgust": "disgust", "disgusted": "disgust", "disgusting": "disgust",
    "fear": "fear", "fearful": "fear", "afraid": "fear", "scared": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "happily": "happy",
    "neutral": "neutral", "neutrality": "neutral", "calm": "neutral",
    "sad": "sad", "sadness": "sad",
    "surprise": "surprise", "surprised": "surprise",
    "contempt": "contempt", "contemptuous": "contempt",
}

# Kaggle's fer2013.csv "emotion" column, as published with the challenge.
FER2013_CODES: dict[int, str] = {0: "angry", 1: "disgust", 2: "fear", 3: "happy", 4: "sad",
                                 5: "surprise", 6: "neutral"}
# RAF-DB basic emotions (list_patition_label.txt), numbered from 1 as in its README.
RAF_DB_CODES: dict[int, str] = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad",
                                6: "angry", 7: "neutral"}


def canonical_class(name: str) -> str:
    """The canonical name of a class folder or label ("Happiness" -> "happy"); a name with no
    known alias is returned unchanged (stripped of surrounding spaces)."""
    stripped = name.strip()
    return CLASS_ALIASES.get(stripped.lower(), stripped)


def code_table(codes: set[int]) -> tuple[str, dict[int, str]]:
    """Which published numbering a set of numeric labels follows: ("RAF-DB", ...) for codes
    1-7, ("FER2013", ...) for codes 0-6 that include 0. Anything else is ambiguous and raises
    ValueError, so a label file is never silently read with the wrong meaning."""
    if codes and codes <= set(RAF_DB_CODES) and 0 not in codes:
        return "RAF-DB", RAF_DB_CODES
    if codes and codes <= set(FER2013_CODES) and 0 in codes:
        return "FER2013", FER2013_CODES
    shown = ", ".join(str(c) for c in sorted(codes)[:10])
    raise ValueError(f"numeric labels {shown} follow neither RAF-DB's 1-7 nor FER2013's 0-6 "
                     "numbering; write class names instead of numbers (e.g. 'img_001.jpg happy')")
