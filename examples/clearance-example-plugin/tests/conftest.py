import pytest

# The contract suites' asserts explain themselves only when pytest rewrites them.
pytest.register_assert_rewrite("clearance.testing.contract")
