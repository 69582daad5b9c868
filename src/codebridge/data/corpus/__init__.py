"""The multi-style corpus: ``build.build_corpus`` makes it (``codebridge data corpus``), ``suites`` names its shards.

Modules: ``sets`` (the pinned npm packages, their licenses, and the reserved sets refused), ``iconify`` (Iconify
JSON: icons, aliases, emoji names to code points), ``raster`` (SVG/PNG to RGB PNG on white), ``captions``,
``plan`` (samples per set and the suite splits), ``build`` and ``suites``.
"""
