"""Every artifact path, in one class: the run's folder and the content-addressed store.

    {storage.url}/                       the run: what a person opens
      spec.yaml                          the spec that ran last (older ones kept as spec.<UTC time>.yaml)
      run.json                           the index: stage -> key -> artifact URL, with the spec that ran
      report/                            a copy of this run's report (index.md, index.html, plots/)
      logs/                              the driver's log, with Ray's and DeepSpeed's chatter
      wandb/                             offline wandb runs (local runs)
    {storage.store}/                     artifacts, shared by every run and sweep trial that points here
      {stage}/{key}/                     one artifact: its files, then stage.json (written last = done)
      stage1/{key}/checkpoints/          Ray Train checkpoints of an unfinished (or finished) stage

The store defaults to ``{storage.url}/store``; a sweep points all its trials at one store, so trials
whose inputs agree share the teacher, the distances and whatever else is equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raptor import storage
from raptor.errors import CorruptArtifact, MissingInput, UserError

SPEC_FILE = "spec.yaml"
INDEX_FILE = "run.json"
MARKER_FILE = "stage.json"


@dataclass
class RunFolder:
    """Where each artifact of one run lives: ``folders`` maps a stage to its keyed folder in the store."""

    run_url: str
    store_url: str
    folders: dict[str, str] = field(default_factory=dict)
    teacher_checkpoint: str | None = None  # a teacher the spec gives, used where it is

    def run(self, *parts: str) -> str:
        return storage.join(self.run_url, *parts)

    def keyed(self, stage: str, key: str) -> str:
        """The store folder of ``stage``'s artifact with ``key``."""
        return storage.join(self.store_url, stage, key)

    def folder(self, stage: str) -> str:
        try:
            return self.folders[stage]
        except KeyError:
            raise MissingInput(f"{self.run_url}: the run has no {stage} artifact yet") from None

    def marker(self, stage: str) -> str:
        return storage.join(self.folder(stage), MARKER_FILE)

    # ---- the run's own files
    @property
    def spec_file(self) -> str:
        return self.run(SPEC_FILE)

    @property
    def index(self) -> str:
        return self.run(INDEX_FILE)

    @property
    def run_report(self) -> str:
        return self.run("report")

    @property
    def logs(self) -> str:
        return self.run("logs")

    # ---- artifacts, by stage
    @property
    def teacher(self) -> str:
        return self.teacher_checkpoint or storage.join(self.folder("teacher"), "teacher.safetensors")

    @property
    def teacher_metrics(self) -> str:
        return storage.join(self.folder("teacher"), "metrics.json")

    @property
    def distances(self) -> str:
        return storage.join(self.folder("distances"), "distances.npy")

    @property
    def segmentation(self) -> str:
        return storage.join(self.folder("discovery"), "segmentation.json")

    def boundaries(self) -> list[int]:
        return [int(b) for b in storage.read_json(self.segmentation)["boundaries"]]

    def student(self, stage: str) -> str:
        return storage.join(self.folder(stage), "student.safetensors")

    def history(self, stage: str) -> str:
        return storage.join(self.folder(stage), "history.json")

    @property
    def probe(self) -> str:
        return storage.join(self.folder("probe"), "results.json")

    @property
    def report(self) -> str:
        return self.folder("report")

    @classmethod
    def from_index(cls, run_url: str) -> "RunFolder":
        """The layout a finished (or partly finished) run recorded in its ``run.json``."""
        url = storage.join(run_url, INDEX_FILE)
        if not storage.exists(url):
            raise UserError(f"{run_url} is not a raptor run (no {INDEX_FILE})")
        index: dict[str, Any] = storage.read_json(url)
        try:
            stages = index.get("stages", {})
            layout = cls(
                run_url=run_url,
                store_url=index["store"],
                folders={name: s["url"] for name, s in stages.items() if s.get("status") == "done"},
                teacher_checkpoint=index.get("teacher_checkpoint"),
            )
        except (AttributeError, KeyError, TypeError) as e:
            raise CorruptArtifact(f"{url}: not a raptor run index ({type(e).__name__}: {e})") from None
        paths = [layout.store_url, *layout.folders.values(), layout.teacher_checkpoint or ""]
        if not all(isinstance(p, str) for p in paths):  # they are joined into paths: a number would be a TypeError
            raise CorruptArtifact(f"{url}: not a raptor run index (store, stage urls and teacher_checkpoint must be strings)")
        return layout


def corrupt_file(folder: str) -> str | None:
    """The first file of a finished artifact that does not match the checksum its ``stage.json`` recorded.

    ``None`` when every file matches, and for folders without a marker or without checksums (a
    given artifact such as ``teacher.checkpoint`` or the data folders, or one made by an earlier
    raptor): those are not ours to check.
    """
    marker = storage.join(folder, MARKER_FILE)
    if not storage.exists(marker):
        return None
    record = storage.read_json(marker)
    files = record.get("files", {}) if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(isinstance(n, str) and n and ".." not in n.split("/") and not n.startswith("/")
                                              and isinstance(d, str) for n, d in files.items()):
        return f"{marker} is not a stage marker (an object whose 'files' maps file names to checksums)"
    for name, digest in sorted(files.items()):
        url = storage.join(folder, name)
        if not storage.exists(url):
            return f"{url} is missing"
        if storage.checksum(url) != digest:
            return f"{url} does not match the sha256 recorded when it was written (truncated, corrupted or replaced)"
    return None
