"""Transitional: stages/evaluate.py still imports the toy world's oracle scores from here.

The judges live in proxytune/toyworld/judges.py and reach the other stages through the world
(`proxytune.builtins.world`); this module goes once the evaluation reads them as metrics (issue 28).
"""

from proxytune.toyworld.judges import oracle_reader, oracle_scores, oracle_weights, shows_style, shows_subject, toy_subject

__all__ = ["oracle_reader", "oracle_scores", "oracle_weights", "shows_style", "shows_subject", "toy_subject"]
