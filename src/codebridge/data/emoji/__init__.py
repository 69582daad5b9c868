"""The built-in emoji benchmark: ``build.build_emoji`` makes it (``codebridge data emoji``), ``suites`` reads it.

Modules, in build order: ``npm`` (pinned sources), ``text`` + ``concepts`` (CLDR text joined with the art),
``images``, ``speech`` (espeak-ng), ``scenes``, ``clips`` (PyAV), ``splits``, ``manifest``; ``canvas``,
``parallel`` and ``records`` are their shared helpers. The layout on disk is in docs/architecture.md.
"""
