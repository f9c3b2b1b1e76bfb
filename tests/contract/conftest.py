"""The contract suite lives in the package: have pytest explain its failed asserts."""

import pytest

pytest.register_assert_rewrite("clearance.testing.contract")
