"""Rank selection: each strategy picks one candidate per layer (a factorization, or keeping the
layer) with the reason, measuring whole models on the search set through a shared `Search`."""

from __future__ import annotations

from .candidates import Candidate, LayerProblem, build_problem
from .search import Choice, Context, Search, SearchObserver, Selection, TracePoint

__all__ = ["Candidate", "LayerProblem", "build_problem", "Choice", "Context", "Search", "SearchObserver", "Selection",
           "TracePoint"]
