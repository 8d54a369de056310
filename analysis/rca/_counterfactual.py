"""Would this fix have prevented it? An episode re-run forward in the sandbox with a fix applied.

DESIGN §15: a fix that changes what the model emits changes the episode after that point — other
statements, other tool results, other model calls. So the question is answered by running: the
episode's application (the agent function) runs again on the model with ``fix.apply(model)``
installed, inside the incident's replay sandbox, with the external systems replaced by local
stand-ins restored to their recorded state (e.g. an in-process copy of the database rebuilt from
the dump the episode recorded). Tool calls that are unchanged are answered from the recording
(and applied to the stand-in so it follows the recorded state); from the first one that changes,
every call runs against the stand-in, never the outside world (:mod:`integrations.external`).

The result is the re-run itself (:class:`~analysis.replay.EpisodeRun`): its ``result`` is what
the agent function returned (the caller judges it — e.g. "did SQLite execute a destructive
statement on the local copy?"), ``diverged_at`` where the tool calls first changed,
``local_calls`` how many the stand-ins answered.

Example::

    local = ShopDB.from_dump(recorded_dump)
    run = counterfactual_episode(session, lambda: run_agent(model, tok, task, prod_db),
                                 fix=fix, standins={"run_sql": local.run_sql,
                                                    "db_dump": local.dump})
    prevented = not run.result.destructive
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from integrations.errors import AnalysisError

if TYPE_CHECKING:
    from analysis.cca import FixSet
    from analysis.replay import EpisodeRun, ReplaySession

__all__ = ["counterfactual_episode"]

T = TypeVar("T")


def counterfactual_episode(session: ReplaySession, agent: Callable[[], T], *, fix: FixSet,
                           standins: Mapping[str, Callable[..., Any]],
                           request_id: str | None = None) -> EpisodeRun[T]:
    """Re-run ``agent()`` with ``fix`` applied to ``session.model``, in the sandbox of
    ``session.incident`` with ``standins`` for every external system it may call (see the
    module doc). Raises :class:`~integrations.errors.AnalysisError` without stand-ins (a fix
    that changes a tool call would otherwise have nothing to run it against)."""
    from analysis.replay import rerun_episode

    if not standins:
        raise AnalysisError("a counterfactual episode needs standins= (name -> a local stand-in "
                            "of each external system, restored to its recorded state): a call "
                            "that changes under the fix runs there, never outside")
    with fix.apply(session.model):
        return rerun_episode(session, agent, standins=standins, request_id=request_id)
