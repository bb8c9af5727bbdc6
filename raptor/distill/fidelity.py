"""How well student states reproduce the teacher's, per layer and token group.

For layer l and a group of tokens, with rows = (samples x tokens) and columns = the D features:

    r2         1 - SS(s_l - a_l) / SS(a_l - mean_rows(a_l))        (pooled over features; the
               authors' validation metric is R^2 against the teacher)
    cosine     mean over rows of cos(s_l, a_l)
    update_r2  the same R^2 on the update: target a_l - a_0, prediction s_l - a_0
    rel_error  ||s_l - a_l|| / ||a_l - a_0||   (Frobenius over rows and features: the epsilon of
               the block-recurrence definition, relative to how far the teacher moved)

Plain r2 is misleading alone: a_0 dominates every state of a weakly trained or random teacher, so
a poor student scores r2 > 0.99; update_r2 and rel_error measure the part the blocks compute.

Everything is accumulated in float64 sums, so :class:`FidelityAccumulator` gives the exact
whole-set value over many batches; :func:`fidelity` is the one-batch shortcut.
"""

from __future__ import annotations

import torch

from raptor.models.teacher import TokenGeometry

METRICS = ("r2", "cosine", "update_r2", "rel_error")


def _groups(geometry: TokenGeometry | None, n_tokens: int) -> dict[str, slice]:
    g = {"all": slice(0, n_tokens)}
    if geometry is not None:
        g.update(geometry.groups())
    return g


class FidelityAccumulator:
    """Accumulate fidelity sums over batches; :meth:`compute` returns the plain dict."""

    def __init__(self, geometry: TokenGeometry | None = None, start: int = 0):
        self.geometry = geometry
        self.start = start
        self._s: dict[str, dict[str, torch.Tensor]] | None = None
        self.layers: list[int] = []

    @torch.no_grad()
    def update(self, states: torch.Tensor, trajectory: torch.Tensor) -> None:
        """``states`` ``[B, n, N, D]`` for layers start+1..start+n; ``trajectory`` ``[B, L+1, N, D]``."""
        B, n, N, D = states.shape
        if trajectory.shape[0] != B or tuple(trajectory.shape[2:]) != (N, D):
            raise ValueError(f"states {tuple(states.shape)} vs trajectory {tuple(trajectory.shape)}")
        if self.start + n > trajectory.shape[1] - 1:
            raise ValueError(f"{n} states from layer {self.start} exceed depth {trajectory.shape[1] - 1}")
        s = states.double()
        a = trajectory[:, self.start + 1 : self.start + 1 + n].double()
        a0 = trajectory[:, :1].double()
        if self._s is None:
            self.layers = list(range(self.start + 1, self.start + 1 + n))
            self._s = {}
        for name, sl in _groups(self.geometry, N).items():
            sg, ag, a0g = s[:, :, sl], a[:, :, sl], a0[:, :, sl]
            upd_t = ag - a0g
            upd_p = sg - a0g
            err = (sg - ag).pow(2).sum(dim=(0, 2, 3))  # [n]
            cos = torch.nn.functional.cosine_similarity(sg, ag, dim=-1, eps=1e-12).sum(dim=(0, 2))
            new = {
                "rows": torch.tensor(float(B * sg.shape[2]), dtype=torch.float64),
                "err": err,
                "sum_a": ag.sum(dim=(0, 2)),  # [n, D]
                "sq_a": ag.pow(2).sum(dim=(0, 2)),
                "sum_u": upd_t.sum(dim=(0, 2)),
                "sq_u": upd_t.pow(2).sum(dim=(0, 2)),
                "upd_err": (upd_p - upd_t).pow(2).sum(dim=(0, 2, 3)),
                "cos": cos,
            }
            acc = self._s.setdefault(name, {})
            for k, v in new.items():
                v = v.cpu()
                acc[k] = acc[k] + v if k in acc else v

    def compute(self) -> dict:
        """``{"layers": [l...], group: {metric: Tensor[n]}}`` for groups all/cls/registers/patches."""
        if self._s is None:
            raise ValueError("no batches accumulated")
        out: dict = {"layers": list(self.layers)}
        for name, acc in self._s.items():
            rows = acc["rows"]
            ss_tot = (acc["sq_a"] - acc["sum_a"].pow(2) / rows).sum(dim=-1)
            ss_upd = (acc["sq_u"] - acc["sum_u"].pow(2) / rows).sum(dim=-1)
            upd_norm2 = acc["sq_u"].sum(dim=-1)
            out[name] = {
                "r2": 1.0 - acc["err"] / ss_tot.clamp_min(1e-30),
                "cosine": acc["cos"] / rows,
                "update_r2": 1.0 - acc["upd_err"] / ss_upd.clamp_min(1e-30),
                "rel_error": (acc["err"] / upd_norm2.clamp_min(1e-30)).sqrt(),
            }
        return out


def fidelity(
    states: torch.Tensor,
    trajectory: torch.Tensor,
    geometry: TokenGeometry | None = None,
    start: int = 0,
) -> dict:
    """Fidelity of one batch (see the module docstring). ``states`` are the student's layers
    start+1..start+n (``student.rollout(trajectory[:, start], start, ...)``). Without ``geometry``
    only the ``all`` group is reported."""
    acc = FidelityAccumulator(geometry, start)
    acc.update(states, trajectory)
    return acc.compute()


def summarize(fid: dict, group: str = "all") -> dict[str, float]:
    """Flat scalars for logging: min/mean of each metric over layers (max for rel_error)."""
    out = {}
    g = fid[group]
    for m in METRICS:
        v = g[m]
        out[f"{group}/{m}/mean"] = float(v.mean())
        out[f"{group}/{m}/{'max' if m == 'rel_error' else 'min'}"] = float(
            v.max() if m == "rel_error" else v.min()
        )
    return out
