"""Run onnx's backend node tests against kiln and report, or rewrite the known-failures file.

    python tools/conformance.py                    # all node tests, summary by reason
    python tools/conformance.py -k conv -v         # only cases whose name contains 'conv', each shown
    python tools/conformance.py --write            # rewrite tests/backend/node_failures.txt

Reasons come from the failure itself (``kiln.conformance.classify``), grouped by its first words, so
the failures file says *why* each case fails, not only that it does. kiln comes from the install
(``make``) or from ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import sys
import time
import unittest
import warnings
from pathlib import Path

from kiln.conformance import classify, node_tests, write_failures

ROOT = Path(__file__).resolve().parent.parent
FAILURES_FILE = ROOT / "tests" / "backend" / "node_failures.txt"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-k", action="append", default=[], help="substring(s) a case name must contain")
    parser.add_argument("-v", action="store_true", help="print every failing case with its reason")
    parser.add_argument("--write", action="store_true", help=f"rewrite {FAILURES_FILE.relative_to(ROOT)}")
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cases, case = node_tests(args.device)
    names = sorted(n for n in cases if not args.k or any(k in n for k in args.k))
    failures: dict[str, str] = {}
    start = time.time()
    for name in names:
        result = unittest.TestResult()
        case(name).run(result)
        problems = result.errors + result.failures
        if problems:
            failures[name] = classify(problems[0][1], name)
            if args.v:
                print(f"FAIL {name}: {failures[name]}")
                lines = [ln for ln in problems[0][1].splitlines() if ln.strip()]
                print("    " + "\n    ".join(lines[-4:]))
        elif result.skipped and args.v:
            print(f"SKIP {name}: {result.skipped[0][1]}")
    passed = len(names) - len(failures)
    by_reason: dict[str, int] = {}
    for reason in failures.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1]):
        print(f"{count:5d}  {reason}")
    print(f"{passed} passed, {len(failures)} failed of {len(names)} node tests ({time.time() - start:.0f}s)")
    if args.write:
        if args.k:
            parser.error("--write needs the whole suite (no -k)")
        write_failures(failures, FAILURES_FILE)
        print(f"wrote {FAILURES_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
