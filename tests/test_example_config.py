"""config/labsync.example.toml is what operators copy: it must load as written."""

from __future__ import annotations

from pathlib import Path

from labsync.config import load

EXAMPLE = Path(__file__).parent.parent / "config" / "labsync.example.toml"
CREDENTIALS = "/run/credentials/labsync.service/"


def test_the_example_config_loads_with_its_credentials_in_place(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in ("db_password", "qlab_api_key"):
        (tmp_path / name).write_text("secret-" + name + "\n")
    path = tmp_path / "labsync.toml"
    path.write_text(text.replace(CREDENTIALS, f"{tmp_path}/"), encoding="utf-8")

    config = load(path, env={})

    assert config.lis.api_key.reveal() == "secret-qlab_api_key"
    assert config.database.url.password == "secret-db_password"
    assert str(config.pdf.dir) == "/var/lib/labsync/lab-results"
    assert config.sync.interval == 900 and config.notify.backend == "bitrix"
