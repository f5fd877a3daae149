"""``python -m gradwatch.bench.worker NAME``: run one case in this fresh interpreter, print its trials.

The runner uses it for cases registered with ``subprocess=True`` (a case that starts processes of its
own, such as a 2-process gloo job, or changes global state). The last stdout line starting with
:data:`~gradwatch.bench.runner.RESULT_MARK` carries the trials as JSON.
"""

from __future__ import annotations

import json
import sys

from gradwatch.bench.registry import get_case
from gradwatch.bench.runner import RESULT_MARK, run_trials


def main(argv: list[str] | None = None) -> int:
    """Run the case named by ``argv[0]`` and print its trials."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m gradwatch.bench.worker CASE_NAME\n")
        return 2
    trials = run_trials(get_case(args[0]))
    sys.stdout.write(RESULT_MARK + json.dumps([t.to_dict() for t in trials]) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
