"""Corpus suites (``corpus-style:test``...) as a registered data source: shard folders named by suite."""

from __future__ import annotations

from codebridge.data.corpus.suites import SUITES, suite_folder
from codebridge.data.sources.spec import SOURCES
from codebridge.data.sources.webdataset import ShardSource, shard_paths


@SOURCES.register("corpus")
class CorpusSource(ShardSource):
    """A corpus suite streams like any shard folder; ``data.root`` is the corpus folder or a home holding it."""

    accepts = f"a corpus suite NAME[:train|:val|:test] ({', '.join(SUITES)})"

    @classmethod
    def handles(cls, spec: str) -> bool:
        return spec.partition(":")[0] in SUITES

    def shards(self) -> list[str]:
        return [str(path) for path in shard_paths(str(suite_folder(self.spec, self.data.root)))]

    def split(self, name: str) -> str:
        return f"{self.spec.partition(':')[0]}:{name}"
