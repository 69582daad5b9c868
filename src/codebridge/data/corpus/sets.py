"""The pinned npm packages of the corpus, the image license each must declare, and the sets that are refused.

Every image set is checked against its own package metadata (Iconify's ``info.json`` and ``package.json``) before
use: a license missing, different from the one pinned here, or not in ``FREE_LICENSES`` stops the build.
"""

from __future__ import annotations

from dataclasses import dataclass

from codebridge.config import ConfigError

# Reserved for an independent evaluation: never fetched, read or listed as data by this project.
RESERVED = ("openmoji", "tuxpaint", "tux-paint", "tux_paint")
FREE_LICENSES = ("MIT", "Apache-2.0", "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-4.0")
ICONIFY_FILES = ("package/icons.json", "package/info.json", "package/package.json", "package/chars.json")


@dataclass(frozen=True)
class ArtSet:
    """One image set: an emoji art style (``kind`` "emoji") or a named icon set ("icons", "flags")."""

    name: str  # style name used in suites and --styles
    package: str  # npm package
    version: str
    license: str  # SPDX id of the image license the package must declare
    kind: str
    noun: str  # what one image is, for sentence captions ("an emoji of ...", "a game icon of ...")
    attribution: str

    @property
    def members(self) -> tuple[str, ...]:
        if self.package.startswith("emoji-datasource-"):
            return ("package/emoji.json", "package/LICENSE", f"package/img/{self.name}/64/*.png")
        return (*ICONIFY_FILES, "package/metadata.json")


def _iconify(name: str, version: str, license: str, kind: str, noun: str, attribution: str) -> ArtSet:
    return ArtSet(name, f"@iconify-json/{name}", version, license, kind, noun, attribution)


SETS: tuple[ArtSet, ...] = (
    # emoji-datasource's package.json says MIT for its data; the art licenses are those of the upstream projects.
    ArtSet("google", "emoji-datasource-google", "16.0.0", "Apache-2.0", "emoji", "emoji", "Noto Emoji, Google"),
    ArtSet("twitter", "emoji-datasource-twitter", "16.0.0", "CC-BY-4.0", "emoji", "emoji", "Twemoji, Twitter, Inc."),
    _iconify("fluent-emoji-flat", "1.2.6", "MIT", "emoji", "emoji", "Microsoft Corporation"),
    _iconify("noto-v1", "1.2.5", "Apache-2.0", "emoji", "emoji", "Google Inc"),
    _iconify("fxemoji", "1.2.2", "Apache-2.0", "emoji", "emoji", "Mozilla"),
    _iconify("emojione-v1", "1.2.3", "CC-BY-SA-4.0", "emoji", "emoji", "Emoji One"),
    _iconify("streamline-emojis", "1.2.4", "CC-BY-4.0", "emoji", "emoji", "Streamline"),
    _iconify("game-icons", "1.2.4", "CC-BY-3.0", "icons", "game icon", "game-icons.net contributors"),
    _iconify("mdi", "1.2.3", "Apache-2.0", "icons", "material design icon", "Pictogrammers"),
    _iconify("tabler", "1.2.41", "MIT", "icons", "line icon", "Paweł Kuna"),
    _iconify("flag", "1.2.12", "MIT", "flags", "flag", "Panayiotis Lipiridis (flag-icons)"),
)
# Text-only sources: (package, version, members, license).
TEXT = {
    "emojilib": ("4.0.3", ("package/dist/emoji-en-US.json", "package/LICENSE"), "MIT"),
    "i18n-iso-countries": ("7.14.0", ("package/langs/*.json", "package/LICENSE"), "MIT"),
}


class LicenseError(ConfigError):
    """An image set is reserved, or its image license is unclear or not free; the build refuses it."""


def refuse_reserved(*names: str) -> None:
    """Raise ``LicenseError`` when any name mentions a reserved set (checked before anything is fetched)."""
    for name in names:
        compact = name.lower().replace(" ", "")
        if any(reserved in compact for reserved in RESERVED):
            raise LicenseError(
                f"{name}: OpenMoji and Tux Paint art are reserved for an independent evaluation and are never "
                "used by codebridge; remove it from the list"
            )


def select(names: list[str] | None, sets: tuple[ArtSet, ...] = SETS) -> tuple[ArtSet, ...]:
    """The sets named by ``--styles`` (all when None), in ``sets`` order; reserved or unknown names are errors."""
    for art in sets:
        refuse_reserved(art.name, art.package)
    if names is None:
        return sets
    refuse_reserved(*names)
    known = {art.name for art in sets}
    if unknown := [n for n in names if n not in known]:
        raise ConfigError(f"unknown style {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    return tuple(art for art in sets if art.name in names)


def check_license(art: ArtSet, declared: list[tuple[str, str | None]]) -> None:
    """``declared`` is (where, SPDX id) read from the package; all must name the pinned, free license."""
    if art.license not in FREE_LICENSES:
        raise LicenseError(f"{art.package}: license {art.license} is not one of {', '.join(FREE_LICENSES)}")
    for where, spdx in declared:
        if spdx != art.license:
            raise LicenseError(
                f"{art.package}: {where} declares license {spdx!r}, expected {art.license}; its image license is "
                "unclear, so the set is not used (check the package and update sets.py)"
            )
