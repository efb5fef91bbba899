"""Step-index bookkeeping of the σ-space schedulers (Euler, Euler ancestral, DPM-Solver++), as diffusers keeps it."""
from __future__ import annotations

import numpy as np
import torch

from ._base import SchedulerBase


class IndexedScheduler(SchedulerBase):
    """A scheduler that walks ``sigmas`` with an internal step counter (``step_index``), as diffusers' k-diffusion
    style schedulers do: the first ``step`` / ``scale_model_input`` finds the index of its timestep in
    ``timesteps`` (the second match when the timestep appears twice, so an image-to-image loop that starts
    mid-schedule does not skip a σ), or starts at ``begin_index`` when set; every ``step`` then advances it by one
    and later timesteps are not looked at.

    ``_ts`` holds the host copy of ``timesteps``; ``_sig64`` the float64 ``(n + 1,)`` σ's the steps use.
    """

    _missing = "raise"  # what a timestep that is not on the schedule does: "raise" or "last" (index n − 1)

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """The index of the next step in ``timesteps`` (``None`` before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index when set by :meth:`set_begin_index` (pipelines set it for image-to-image)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next loop at step ``begin_index`` without looking its timestep up (no host sync)."""
        if isinstance(begin_index, bool) or int(begin_index) != begin_index or int(begin_index) < 0:
            raise ValueError(f"{self._name}.set_begin_index: begin_index must be an int ≥ 0; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """The index of ``timestep`` in ``timesteps`` (the second match if it appears more than once).

        A device tensor is read back once here (as diffusers does); call :meth:`set_begin_index` to avoid it."""
        sched = self._ts if schedule_timesteps is None else np.asarray(
            schedule_timesteps.detach().cpu() if isinstance(schedule_timesteps, torch.Tensor) else schedule_timesteps)
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.detach().reshape(()).cpu().item()
        hits = np.nonzero(sched == np.asarray(timestep, dtype=sched.dtype))[0]
        if hits.size == 0:
            if self._missing == "last":
                return len(sched) - 1
            raise ValueError(f"{self._name}: timestep {timestep} is not one of scheduler.timesteps; pass the values "
                             "of scheduler.timesteps (not their indices)")
        return int(hits[1] if hits.size > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _lookup(self, t: torch.Tensor, device) -> torch.Tensor:
        """``(B,)`` long indices of the ``(B,)`` timesteps ``t`` in ``timesteps`` on ``device``, by tensor ops only
        (same rule as :meth:`index_for_timestep`). CPU timesteps that are not on the schedule raise; device ones
        (which cannot be checked without a sync) take index 0 (Euler) or ``n − 1`` (DPM, as diffusers)."""
        sched = self._on("ts", torch.from_numpy(self._ts), device)
        t = t.to(device=device, dtype=sched.dtype)
        match = sched.unsqueeze(0) == t.unsqueeze(1)
        count = match.sum(1)
        want = torch.where(count > 1, 2, 1)
        idx = ((match.cumsum(1) == want.unsqueeze(1)) & match).to(torch.int32).argmax(1).long()
        if t.device.type == "cpu" and self._missing == "raise" and bool((count == 0).any()):
            bad = t[count == 0][0].item()
            raise ValueError(f"{self._name}: timestep {bad} is not one of scheduler.timesteps; pass the values of "
                             "scheduler.timesteps (not their indices)")
        if self._missing == "last":
            idx = torch.where(count == 0, torch.full_like(idx, len(self._ts) - 1), idx)
        return idx

    def _sigma_indices(self, timesteps, device, what: str) -> torch.Tensor:
        """``(B,)`` long σ indices for ``add_noise``: looked up per timestep, or the current / begin index once a
        loop has started (diffusers' rule)."""
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps)
        t = timesteps.reshape(-1)
        if self._begin_index is None:
            return self._lookup(t, device)
        i = self._step_index if self._step_index is not None else self._begin_index
        return torch.full((t.shape[0],), i, dtype=torch.long, device=device)

    def _current_index(self, host, what: str) -> int:
        if self._step_index is None:
            self._init_step_index(host)
        i = self._step_index
        if i + 1 >= len(self._sig64):
            raise ValueError(f"{self._name}.{what}: all {len(self._sig64) - 1} steps of the schedule have been taken; "
                             "call set_timesteps again")
        return i

    def _parse_timestep(self, timestep, batch: int, what: str, *, check_range: bool = True):
        """``(host, per_sample)``: a one-element timestep is a scalar (``host``, read back only when the step index
        has to be found from it: a device tensor then costs one sync, like diffusers — avoid it with
        :meth:`set_begin_index`); a ``(B,)`` tensor with ``B > 1`` is per-sample (``per_sample``)."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() == 1 and timestep.dim() <= 1:
            if self._step_index is not None or self._begin_index is not None:
                return None, None  # the counter decides; the timestep is not read (as diffusers)
            value = timestep.detach().reshape(()).cpu().item()
            return self._host_timestep(value, f"{self._name}.{what}", int(self.config.num_train_timesteps),
                                       False, check_range), None
        host, per = self._timestep(timestep, batch, integral=False, check_range=check_range, what=what)
        if host is not None and (self._step_index is not None or self._begin_index is not None):
            return None, None
        return host, per
