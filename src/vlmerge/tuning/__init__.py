"""`vlmerge tune`: search a merge method's options on validation data, write the best merge.

A grid is one `GridAxis` per searched option (`grid`); every candidate is checked by the method's
options class before anything is merged. The inputs are opened once; each candidate is merged in
memory from those open files and scored on the validation split only (`scorers`); the best, the first
of equals, is written as `vlmerge merge` writes it, with the search table in its merge record (`search`).

It lives outside `vlmerge.merging` because it scores merges with `vlmerge.tasks`.
"""

from vlmerge.tuning.grid import (
    MAX_CANDIDATES,
    SIGNIFICANT_DIGITS,
    GridAxis,
    candidate_options,
    check_grid_size,
    grid_points,
    parse_grid,
)
from vlmerge.tuning.scorers import SPLIT, TRAIN_SPLIT, ProbeScorer, RetrievalScorer, TuneObjective
from vlmerge.tuning.search import (
    Candidate,
    SearchTable,
    TuneResult,
    best_index,
    read_search_table,
    tune_checkpoint,
)

__all__ = [
    "MAX_CANDIDATES",
    "SIGNIFICANT_DIGITS",
    "SPLIT",
    "TRAIN_SPLIT",
    "Candidate",
    "GridAxis",
    "ProbeScorer",
    "RetrievalScorer",
    "SearchTable",
    "TuneObjective",
    "TuneResult",
    "best_index",
    "candidate_options",
    "check_grid_size",
    "grid_points",
    "parse_grid",
    "read_search_table",
    "tune_checkpoint",
]
