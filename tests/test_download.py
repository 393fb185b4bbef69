import pytest

from fer_core.download import download_dataset, find_credentials
from fer_core.errors import FerError

KAGGLE_VARS = ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in KAGGLE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_missing_credentials_name_what_to_set(no_credentials, tmp_path):
    assert find_credentials() is None
    with pytest.raises(FerError) as info:
        download_dataset("msambare/fer2013", tmp_path / "dest")
    message = str(info.value)
    assert "KAGGLE_API_TOKEN" in message and "access_token" in message and "kaggle.json" in message


def test_credentials_are_found_in_env_or_config_dir(no_credentials, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    assert find_credentials() == "KAGGLE_USERNAME/KAGGLE_KEY"
    monkeypatch.delenv("KAGGLE_KEY")
    folder = tmp_path / "kaggle-config"
    folder.mkdir()
    (folder / "access_token").write_text("token")
    assert find_credentials() is None  # kagglesdk reads an access token from ~/.kaggle only
    (folder / "kaggle.json").write_text('{"username": "me", "key": "secret"}')
    assert find_credentials() == str(folder / "kaggle.json")
    token = tmp_path / "home" / ".kaggle" / "access_token"
    token.parent.mkdir(parents=True)
    token.write_text("token")
    assert find_credentials() == str(token)


def test_kaggle_json_is_found_where_kaggle_looks_without_a_config_dir(no_credentials, monkeypatch, tmp_path):
    monkeypatch.delenv("KAGGLE_CONFIG_DIR")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    legacy = tmp_path / "home" / ".config" / "kaggle" / "kaggle.json"  # used on Linux when ~/.kaggle is missing
    legacy.parent.mkdir(parents=True)
    legacy.write_text('{"username": "me", "key": "secret"}')
    assert find_credentials() == str(legacy)


def test_an_existing_download_is_reused_without_credentials(no_credentials, tmp_path):
    dest = tmp_path / "fer"
    dest.mkdir()
    (dest / ".download-complete").write_text("msambare/fer2013")
    messages = []
    assert download_dataset("msambare/fer2013", dest, log=messages.append) == dest
    assert "already downloaded" in messages[0]


def test_a_malformed_slug_is_refused(no_credentials):
    with pytest.raises(FerError, match="owner/name"):
        download_dataset("fer2013")
