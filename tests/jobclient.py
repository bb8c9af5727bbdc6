"""Ray's JobSubmissionClient where no cluster can be reached: it records the jobs it is sent."""

from __future__ import annotations

from typing import Any


class RecordingClient:
    """Stands in for ``ray.job_submission.JobSubmissionClient``; ``sent`` holds every job, in order."""

    sent: list[dict[str, Any]] = []

    def __init__(self, address: str) -> None:
        self.address = address

    def submit_job(self, **job: Any) -> str:
        RecordingClient.sent.append(job)
        return "raysubmit_recorded"
