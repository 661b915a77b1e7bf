import pytest
from megengine.hub.fetcher import RepoFetcherBase

from mirror.errors import SpecError
from mirror.refs import RepoSpec, parse_repo_info


@pytest.mark.parametrize("text, expected", [
    ("megengine/models", RepoSpec("megengine", "models")),
    ("megengine/models:dev", RepoSpec("megengine", "models", ref="dev")),
    ("megengine/models@78882F9", RepoSpec("megengine", "models", commit="78882f9")),
    ("megengine/models:v1.2.0@63c0390f",
     RepoSpec("megengine", "models", ref="v1.2.0", commit="63c0390f")),
    ("git.corp.example/vision/models:main",
     RepoSpec("vision", "models", host="git.corp.example", ref="main")),
    ("127.0.0.1:8080/demo/tinynets:feature/x",
     RepoSpec("demo", "tinynets", host="127.0.0.1:8080", ref="feature/x")),
    ("megengine/models.git", RepoSpec("megengine", "models")),
])
def test_spec_grammar(text, expected):
    assert RepoSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["models", "a/b/c/d", "owner/name@xyz", "owner/name:",
                                  "owner/name:../x", ""])
def test_bad_specs_name_the_spec(text):
    with pytest.raises(SpecError) as e:
        RepoSpec.parse(text)
    assert repr(text) in str(e.value)


def test_spec_urls():
    spec = RepoSpec.parse("megengine/models:dev")
    assert spec.url() == "https://github.com/megengine/models"
    assert spec.url("ssh") == "git@github.com:megengine/models.git"
    assert str(spec) == "megengine/models:dev"


@pytest.mark.parametrize("info", ["megengine/models", "megengine/models:dev",
                                  "Owner/Name:release/1.0"])
def test_repo_info_split_matches_megengine(info):
    assert parse_repo_info(info) == RepoFetcherBase._parse_repo_info(info)


def test_repo_info_errors_like_megengine():
    with pytest.raises(SpecError):
        parse_repo_info("megengine")
