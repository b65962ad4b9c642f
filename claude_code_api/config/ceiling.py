"""What the operator lets a run ask for, and holding saved options to it.

:class:`OptionCeiling` is read from the settings once (``ALLOWED_MODELS``,
``ALLOWED_PERMISSION_MODES``, ``MAX_TURNS_LIMIT``, ``MAX_BUDGET_USD_LIMIT``).
A request asking beyond it is refused (``http/requests.py``: a 400). A session's
options were saved with it under the ceiling of their day, and the service may
have been restarted with a lower one since: :meth:`OptionCeiling.hold` brings
them under the ceiling in force every time a session's agent starts — a number
above its limit is lowered to it, a model no longer allowed falls back to the
default model (``CLAUDE_MODEL``), a permission mode no longer allowed to the
default mode (``bypassPermissions``, what a request that names none runs with) —
and says what it changed, for the turn's reply.

Plain data, no I/O; never raises.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..messages import DEFAULT_PERMISSION_MODE, RunOptions
from .settings import Settings


@attrs.frozen
class Held:
    """Options under the ceiling, and what :meth:`OptionCeiling.hold` changed to get them:
    the API's field names with the values that run (empty: nothing changed)."""

    options: RunOptions
    changed: dict[str, Any] = attrs.field(factory=dict, eq=False)


@attrs.frozen
class OptionCeiling:
    """What the operator lets a request ask for (None: no limit)."""

    allowed_models: tuple[str, ...]
    allowed_permission_modes: tuple[str, ...]
    max_turns: int | None = None
    max_budget_usd: float | None = None
    # The model an agent runs when its options name none.
    default_model: str | None = None

    @classmethod
    def of(cls, settings: Settings) -> OptionCeiling:
        """The ceiling the operator configured (the app's, the OpenAPI document's, and the
        one session agents start under)."""
        return cls(
            allowed_models=settings.allowed_models,
            allowed_permission_modes=settings.allowed_permission_modes,
            max_turns=settings.max_turns_limit,
            max_budget_usd=settings.max_budget_usd_limit,
            default_model=settings.model,
        )

    def hold(self, options: RunOptions) -> Held:
        """``options`` brought under this ceiling (see the module docstring)."""
        changed: dict[str, Any] = {}
        held = options
        if options.model is not None and options.model not in self.allowed_models:
            held = attrs.evolve(held, model=None)
            changed["model"] = self.default_model
        if self.max_turns is not None and (options.max_turns or 0) > self.max_turns:
            held = attrs.evolve(held, max_turns=self.max_turns)
            changed["maxTurns"] = self.max_turns
        budget = options.max_budget_usd
        if self.max_budget_usd is not None and budget is not None and budget > self.max_budget_usd:
            held = attrs.evolve(held, max_budget_usd=self.max_budget_usd)
            changed["maxBudgetUsd"] = self.max_budget_usd
        mode = options.permission_mode
        if mode is not None and mode not in self.allowed_permission_modes:
            held = attrs.evolve(held, permission_mode=None)
            if mode != DEFAULT_PERMISSION_MODE:  # (asked for by name, it is the same mode)
                changed["permissionMode"] = DEFAULT_PERMISSION_MODE
        return Held(held, changed)
