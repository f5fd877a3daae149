"""Re-export of :mod:`gradwatch.integrations.lightning` (the callback's former home).

``from gradwatch.lightning import GradWatchCallback`` keeps working.
"""

from gradwatch.integrations.lightning import GradWatchCallback

__all__ = ["GradWatchCallback"]
