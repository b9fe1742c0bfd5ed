"""Constants shared by the client tests (a module of its own: `conftest` is not importable by name when
several test folders each have one)."""

ADMIN_TOKEN = "test-admin-token"
