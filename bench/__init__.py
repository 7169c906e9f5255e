"""kanband benchmark suite: `python -m bench [--quick] [--only NAME] [--json PATH]`.

Each metric runs kanband and its baseline side by side in the same process run
(interleaved where the metric allows), so machine noise hits both alike.
Not part of the test suite; see docs/performance.md for what each figure means.
"""
