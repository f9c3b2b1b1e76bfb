"""Where `tenant://NAME` puts a tenant's database, and which names it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from clearance_example_plugin.tenant_store import open_url


async def test_a_tenant_is_a_file_in_the_tenants_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARANCE_TENANTS", str(tmp_path / "made" / "here"))
    await open_url("tenant://acme-2", synchronous="NORMAL").close()
    assert (tmp_path / "made" / "here" / "acme-2.db").is_file()


async def test_the_default_directory_is_tenants_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLEARANCE_TENANTS", raising=False)
    monkeypatch.chdir(tmp_path)
    await open_url("tenant://acme").close()
    assert (tmp_path / "tenants" / "acme.db").is_file()


@pytest.mark.parametrize(
    "url",
    [
        "tenant://",
        "tenant://Acme",
        "tenant://../acme",
        "tenant://a/b",
        "tenant://a.b",
        "tenant://" + "a" * 41,
        "sqlite:///acme.db",
    ],
)
def test_a_bad_name_is_refused_saying_what_is_accepted(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARANCE_TENANTS", str(tmp_path))
    with pytest.raises(ValueError, match=r"tenant://NAME, NAME being 1-40 lowercase letters"):
        open_url(url)
    assert list(tmp_path.iterdir()) == []
