"""Test support for singularity-stack, installed with the `test` extra (`pip install -e ".[test]"`).

What the test suite, the e2e suite and the benchmarks share, and production code never imports (an
import-linter contract in pyproject.toml says so): a throwaway PostgreSQL (`postgres`), the real local
Kubernetes control plane and single-node cluster (`kube`), and the helpers for a cluster under test
(`cluster`, `providers`, `stacks`). Like `procrastinate.testing`, it is part of the distribution; the
images install only services/ and operator/, so it never reaches them.

It works from a checkout (an editable install): the cluster helpers build the images and install the
chart from ROOT.
"""

from __future__ import annotations

from pathlib import Path

# The checkout this package lives in (testing/singularity_stack_testing/ under it).
ROOT = Path(__file__).resolve().parents[2]
