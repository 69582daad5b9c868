"""Built-in suites (``emoji-style:test``...): the emoji benchmark as one source among others.

Everything generic code needs to know about the suites (their class names, their train split, the concept ->
group table) is answered here, so no generic module imports the emoji package.
"""

from __future__ import annotations

from codebridge.data.emoji.suites import SUITES
from codebridge.data.sample import Sample
from codebridge.data.sources.spec import SOURCES, ListSource


@SOURCES.register("builtin")
class BuiltinSource(ListSource):
    accepts = f"a built-in suite NAME[:train|:test] ({', '.join(SUITES)})"

    @classmethod
    def handles(cls, spec: str) -> bool:
        return spec.partition(":")[0] in SUITES

    def read(self) -> list[Sample]:
        from codebridge.data.emoji.suites import load_suite

        name, _, split = self.spec.partition(":")
        return load_suite(name, split or "train", self.data.root)

    def class_names(self, label: str) -> dict[int, str]:
        from codebridge.data.emoji.suites import class_names

        return dict(enumerate(class_names(label, self.data.root)))

    def split(self, name: str) -> str:
        return f"{self.spec.partition(':')[0]}:{name}"

    def concept_groups(self) -> dict[int, int]:
        from codebridge.data.emoji.suites import EmojiData

        return {c: row["group_id"] for c, row in EmojiData.open(self.data.root).concepts.items()}
