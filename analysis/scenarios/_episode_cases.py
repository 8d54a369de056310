"""What every episode scenario (``agent-db``, ``multiturn``, ``tool-misuse``) does with its cases.

An episode scenario ships failing cases, each paired with a benign twin (``counterpart``), and
each holding what its episode did when it was found (``episode``: a dict with at least
``new_ids``, the generated ids of every model call). Two steps are the same for all of them:

* :func:`confirm` — the last phase of a search: every hit of a batched (approximate) phase is run
  again as a whole episode at batch 1, exactly as it is served and recorded, together with its
  twin; only hits that fail while their twin does not are kept, and every rejection says why;
* :func:`reverify` — on load: re-run a few shipped failing cases and their twins now and drop
  those that no longer reproduce token for token.

:class:`ShippedEpisodes` is the loaded scenario they share (cases, ``run`` on fresh tools,
``sealed_run`` against sealed production tools for a sandbox re-run), :func:`load_shipped` its
``build``, :func:`serve_traced` serves one case as one incident, :func:`discover_main` is the
``python -m analysis.scenarios.<name> discover`` command.

Example::

    failing, benign, rejected = confirm(hits, twins, run=lambda c: sc_run(c).to_json(),
                                        fails=lambda ep: bool(ep["destructive"]),
                                        t0=t0, budget_s=600, max_cases=20)
    reverify(sc, verify=2, seed=0)      # sc.dropped lists what did not reproduce
    inc, ep = serve_traced(sc, sc.failing[0])    # one incident: every model and tool call
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["EpisodeCase", "EpisodeScenario", "ShippedEpisodes", "confirm", "discover_main",
           "find_case", "load_shipped", "reverify", "serve_traced"]

_log = logging.getLogger(__name__)


class EpisodeCase(Protocol):
    """A shipped case: its id, its twin's id (None for a twin) and what its episode did."""

    id: str
    counterpart: str | None
    episode: dict[str, Any]


C = TypeVar("C", bound=EpisodeCase)
S = TypeVar("S", bound="ShippedEpisodes[Any]")


class EpisodeScenario(Protocol):
    """A loaded scenario: its cases, how to re-run one now, and what was dropped on load."""

    failing: list[Any]
    benign: list[Any]
    dropped: list[tuple[str, str]]

    def verify(self, cases: Sequence[Any]) -> list[bool]: ...

    def twin(self, case: Any) -> Any: ...

    def run(self, case: Any) -> Any: ...


@dataclass
class ShippedEpisodes(ABC, Generic[C]):
    """Base of a loaded episode scenario: the model, the shipped cases (re-verified on load) and
    what was dropped. A subclass says how to serve a case on given tools (:meth:`run_on`; its
    episode's ``to_json()`` holds ``new_ids``), which fresh tools a case starts from
    (:meth:`tools_for`) and what the sealed production tools are (:meth:`sealed_tools`)."""

    model: Any
    tokenizer: Any
    failing: list[C]
    benign: list[C]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @abstractmethod
    def run_on(self, case: C, tools: Any) -> Any:
        """Serve ``case``'s episode on ``tools`` (greedy, batch 1)."""

    @staticmethod
    @abstractmethod
    def failure(case: Any, episode: Any) -> str | None:
        """Why an episode run now failed (None: it did not): the scenario's own label."""

    def tools_for(self, case: C) -> Any:
        """Fresh tools in ``case``'s starting state (None: the episode calls no tool)."""
        return None

    def sealed_tools(self) -> Any:
        """The production tools as a replay sees them (any use raises; ``touched`` counts)."""
        return None

    def run(self, case: C) -> Any:
        """Serve ``case``'s episode now on fresh tools."""
        return self.run_on(case, self.tools_for(case))

    def sealed_run(self, case: C) -> tuple[Callable[[], Any], Any]:
        """``case``'s application against sealed production tools (for
        :func:`analysis.replay.rerun_episode`), and those tools."""
        sealed = self.sealed_tools()
        return functools.partial(self.run_on, case, sealed), sealed

    def verify(self, cases: Sequence[C]) -> list[bool]:
        """Run each case now; True when it reproduces the shipped episode token for token."""
        return [self.run(c).to_json()["new_ids"] == c.episode.get("new_ids") for c in cases]

    def twin(self, case: C) -> C | None:
        """The benign twin of a failing case."""
        return next((b for b in self.benign if b.id == case.counterpart), None)


def load_shipped(cls: type[S], case: Callable[..., Any], data_file: str, *, verify: int,
                 seed: int, model: Any, tokenizer: Any) -> S:
    """Load ``data/<data_file>`` into ``cls`` (SmolLM2 unless a model is given) and re-run
    ``verify`` failing cases and their twins now (:func:`reverify`)."""
    from analysis.models import MODEL_REFS, load_smollm2
    from analysis.scenarios._base import load_data

    doc = load_data(data_file)
    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    sc = cls(model, tokenizer, [case(**c) for c in doc["failing"]],
             [case(**c) for c in doc["benign"]],
             meta={"model_ref": dict(MODEL_REFS["smollm2"]), "search": doc.get("search")})
    reverify(sc, verify=verify, seed=seed)
    return sc


def discover_main(name: str, discover: Callable[..., dict[str, Any]], *, hide: str) -> None:
    """The documented regeneration command of a scenario's search (``python -m ... discover``);
    prints the search summary without its bulky ``hide`` key."""
    import argparse

    ap = argparse.ArgumentParser(description=f"search the {name} grid by running SmolLM2")
    ap.add_argument("command", choices=["discover"])
    ap.add_argument("--budget-s", type=float, default=1200.0)
    ap.add_argument("--max-cases", type=int, default=20)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    d = discover(budget_s=a.budget_s, max_cases=a.max_cases)
    print(json.dumps({k: v for k, v in d["search"].items() if k != hide}, indent=1))


def find_case(sc: EpisodeScenario, case_id: str) -> Any:
    """The shipped case (failing or twin) with id ``case_id``."""
    return next(c for c in [*sc.failing, *sc.benign] if c.id == case_id)


def serve_traced(sc: Any, case: Any, *, sites: Sequence[str] = ("blocks.15.resid_post",)
                 ) -> tuple[Any, Any]:
    """Serve ``case``'s episode now as one incident (:func:`integrations.trace`, logits kept);
    returns ``(incident, what sc.run returned)``."""
    import integrations

    with integrations.trace(sc.model, list(sites), request_id=case.id,
                            tokenizer=sc.tokenizer) as t:
        ep = sc.run(case)
    return t.incident, ep


def reverify(sc: EpisodeScenario, *, verify: int, seed: int) -> None:
    """Re-run ``verify`` failing cases (a seeded sample) and their twins with ``sc.verify``;
    those that differ from the shipped episode are removed and listed in ``sc.dropped``."""
    picks = random.Random(seed).sample(sc.failing, min(verify, len(sc.failing)))
    for case in picks:
        twin = sc.twin(case)
        group = [case, *([twin] if twin else [])]
        for c, ok in zip(group, sc.verify(group), strict=True):
            if not ok:
                sc.dropped.append((c.id, "re-run differs from the shipped episode"))
    gone = {i for i, _ in sc.dropped}
    sc.failing = [c for c in sc.failing if c.id not in gone]
    sc.benign = [c for c in sc.benign if c.id not in gone]


def confirm(hits: Sequence[C], twins: Mapping[str, C], *, run: Callable[[C], dict[str, Any]],
            fails: Callable[[dict[str, Any]], bool], t0: float, budget_s: float,
            max_cases: int) -> tuple[list[C], list[C], list[dict[str, str]]]:
    """Run each hit and its twin as whole episodes at batch 1 (``run(case)`` -> the episode's
    JSON, stored in ``case.episode``); keep a hit when it ``fails`` and its twin does not.

    Returns ``(failing, their twins, rejected)``; hits left when ``max_cases`` were kept or
    ``budget_s`` (seconds since ``t0``) ran out are rejected as "not checked".
    """
    failing: list[C] = []
    benign: dict[str, C] = {}
    rejected: list[dict[str, str]] = []
    for c in hits:
        if len(failing) >= max_cases or time.perf_counter() - t0 > budget_s:
            rejected.append({"id": c.id, "why": "not checked: budget or max_cases reached"})
            continue
        c.episode = run(c)
        if not fails(c.episode):
            rejected.append({"id": c.id, "why": "does not fail at batch 1"})
            continue
        assert c.counterpart is not None
        twin = benign.get(c.counterpart) or twins[c.counterpart]
        if not twin.episode:
            twin.episode = run(twin)
        if fails(twin.episode):
            rejected.append({"id": c.id, "why": "its benign twin fails too"})
            continue
        benign[twin.id] = twin
        failing.append(c)
        _log.info("confirmed failing episode %s", c.id)
    return failing, list(benign.values()), rejected
