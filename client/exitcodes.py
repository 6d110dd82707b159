"""The exit codes of the user commands (README.md and docs/user-guide.md list them)."""

from __future__ import annotations

OK = 0
# The run did not succeed, a check failed, or `runs compare` found a regression.
FAILED = 1
# A usage error, or the controller refused the request (a spec error names its fields).
USAGE = 2
# The checks were judged on stages whose numbers are flagged as suspect (`--allow-suspect`),
# or `runs compare` could not tell a change beyond the tolerance from noise.
INCONCLUSIVE = 3
# No controller answered at the address (down, wrong address, TLS mismatch).
UNREACHABLE = 4
# Ctrl-C: the run was cancelled (its partial result printed) or, on a second Ctrl-C, detached.
INTERRUPTED = 130
