"""Several captions per image: the canonical name first (what evaluation queries with), then sentences, keywords
and other languages, so training sees varied text for one concept. Captions never name the art style, so the text
cannot tell a held-out style apart."""

from __future__ import annotations

import re
from typing import Any

LOCALES = ("de", "fr", "es", "ja")  # beside en: the emoji labels and the country names
_WORDS = re.compile(r"^[\w' .&-]+$")  # emojilib also lists emoticons (":D"), which are no caption words


def _unique(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in (t.strip() for t in texts):
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


def readable(name: str) -> str:
    """An icon name as words: "crossed-swords" -> "crossed swords", "emoji_people" -> "emoji people"."""
    return re.sub(r"[-_]+", " ", name).strip()


def emoji_captions(concept: dict[str, Any], keywords: list[str]) -> list[str]:
    """CLDR label, sentences, CLDR keywords, emojilib keywords, and the label in four more languages."""
    label = concept["name"]
    tags = concept["tags"].get("en", [])
    same = re.sub(r"\W+", "", label.lower())
    extra = [readable(k) for k in keywords if _WORDS.match(k) and re.sub(r"\W+", "", readable(k)) != same]
    return _unique(
        [
            label,
            f"an emoji of {label}",
            f"a picture of {label}",
            ", ".join(tags),
            f"{label}: {', '.join(extra[:6])}" if extra else "",
            *(concept["labels"].get(locale, "") for locale in LOCALES),
        ]
    )


def icon_captions(name: str, noun: str, category: str | None) -> list[str]:
    """ "crossed swords", "a game icon of crossed swords", "a picture of crossed swords", "crossed swords (weapons)"."""
    words = readable(name)
    article = "an" if noun[0] in "aeiou" else "a"
    return _unique(
        [
            words,
            f"{article} {noun} of {words}",
            f"a picture of {words}",
            f"{words} ({category.lower()})" if category else "",
        ]
    )


def flag_captions(names: dict[str, str]) -> list[str]:
    """``names``: locale -> country name (en first): "flag of Germany", sentences, then the name in each locale."""
    english = names["en"]
    return _unique(
        [f"flag of {english}", f"the flag of {english}", f"a picture of the flag of {english}", english]
        + [names[locale] for locale in LOCALES if locale in names]
    )
