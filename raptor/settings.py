"""The base of every settings model: the job spec's sections are composed of the settings the libraries
and the runner declare, so each setting has one declaration, one default and one set of rules."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """Unknown fields are errors (a typo is never ignored); assignments are validated like construction."""

    # NaN and infinity are never a setting: `lr: .inf` would pass `gt=0` and diverge at step 1
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def updated(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new model (pydantic's ``model_copy`` skips validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})
