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
    """Where each artifact of one run lives: ``folders`` maps a stage to its artifact (a keyed folder in the
    store, or where the spec puts it); ``given`` the artifacts the spec supplies, used where they are.

    The stages say where their artifacts live (``Stage.location``); :func:`raptor.service.engine.pipeline.plan`
    records each one here. The named files below are conveniences for the readers of a run (the
    spec's translation, sweeps, the analysis, tests), which the stage modules import and so cannot
    import in turn; each is a file of one stage's folder (:meth:`file`).
    """

    run_url: str
    store_url: str
    folders: dict[str, str] = field(default_factory=dict)
    given: dict[str, str] = field(default_factory=dict)

    def run(self, *parts: str) -> str:
        return storage.join(self.run_url, *parts)

    def keyed(self, stage: str, key: str) -> str:
        """The store folder of ``stage``'s artifact with ``key``."""
        return storage.join(self.store_url, stage, key)

    def record(self, stage: str, url: str, given: bool = False) -> None:
        """``stage``'s artifact is at ``url`` (``given``: the spec supplies it)."""
        self.folders[stage] = url
        if given:
            self.given[stage] = url

    def folder(self, stage: str) -> str:
        try:
            return self.folders[stage]
        except KeyError:
            raise MissingInput(f"{self.run_url}: the run has no {stage} artifact yet") from None

    def file(self, stage: str, name: str) -> str:
        """The file ``name`` of ``stage``'s artifact."""
        return storage.join(self.folder(stage), name)

    def marker(self, stage: str) -> str:
        return self.file(stage, MARKER_FILE)

    # ---- the run's own files
    @property
    def spec_file(self) -> str:
        return self.run(SPEC_FILE)

    @property
    def index(self) -> str:
        return self.run(INDEX_FILE)

    @property
    def logs(self) -> str:
        return self.run("logs")

    # ---- named files of the artifacts, for their readers
    @property
    def teacher_checkpoint(self) -> str | None:
        """A teacher the spec gives (``teacher.checkpoint``), used where it is."""
        return self.given.get("teacher")

    @property
    def teacher(self) -> str:
        return self.teacher_checkpoint or self.file("teacher", "teacher.safetensors")

    @property
    def teacher_metrics(self) -> str:
        return self.file("teacher", "metrics.json")

    @property
    def distances(self) -> str:
        return self.file("distances", "distances.npy")

    @property
    def segmentation(self) -> str:
        return self.file("discovery", "segmentation.json")

    def boundaries(self) -> list[int]:
        return [int(b) for b in storage.read_json(self.segmentation)["boundaries"]]

    def student(self, stage: str) -> str:
        return self.file(stage, "student.safetensors")

    def history(self, stage: str) -> str:
        return self.file(stage, "history.json")

    @property
    def probe(self) -> str:
        return self.file("probe", "results.json")

    @property
    def probe_heads(self) -> str:
        return self.file("probe", "heads.safetensors")

    # ---- run.json
    def header(self) -> dict[str, Any]:
        """What ``run.json`` records of this object beside each stage's URL (:meth:`from_index` reads it back)."""
        return {"store": self.store_url, "teacher_checkpoint": self.teacher_checkpoint}

    @classmethod
    def from_index(cls, run_url: str) -> "RunFolder":
        """Where a finished (or partly finished) run's artifacts are, as its ``run.json`` recorded them."""
        url = storage.join(run_url, INDEX_FILE)
        if not storage.exists(url):
            raise UserError(f"{run_url} is not a raptor run (no {INDEX_FILE})")
        index: dict[str, Any] = storage.read_json(url)
        try:
            stages = index.get("stages", {})
            teacher_checkpoint = index.get("teacher_checkpoint")
            run_folder = cls(
                run_url=run_url,
                store_url=index["store"],
                folders={name: s["url"] for name, s in stages.items() if s.get("status") == "done"},
                given={"teacher": teacher_checkpoint} if teacher_checkpoint else {},
            )
        except (AttributeError, KeyError, TypeError) as e:
            raise CorruptArtifact(f"{url}: not a raptor run index ({type(e).__name__}: {e})") from None
        paths = [run_folder.store_url, *run_folder.folders.values(), *run_folder.given.values()]
        if not all(isinstance(p, str) for p in paths):  # they are joined into paths: a number would be a TypeError
            raise CorruptArtifact(f"{url}: not a raptor run index (store, stage urls and teacher_checkpoint must be strings)")
        return run_folder


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
