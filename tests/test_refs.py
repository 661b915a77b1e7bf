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


@pytest.mark.parametrize("text, expected", [
    ("https://github.com/megengine/models", RepoSpec("megengine", "models")),
    ("https://github.com/megengine/models.git/", RepoSpec("megengine", "models")),
    ("https://git.corp.example:8443/vision/models",
     RepoSpec("vision", "models", host="git.corp.example:8443")),
])
def test_a_pasted_url_is_a_spec(text, expected):
    assert RepoSpec.parse(text) == expected


@pytest.mark.parametrize("text, said", [
    ("owner/name@v1.0", "'v1.0' after '@' is not a commit id (4 to 40 hex digits); a "
                        "branch or tag goes after ':' (owner/name:v1.0)"),
    ("owner/name#dev", "name 'name#dev' may hold only letters, digits, '.', '_' and '-', "
                       "starting with a letter or digit (nested groups are not supported)"),
    ("-owner/name", "owner '-owner' may hold only letters, digits, '.', '_' and '-', "
                    "starting with a letter or digit (nested groups are not supported)"),
    ("http://127.0.0.1:8080/demo/tinynets",
     "a http:// URL: name the repo as host/owner/name and pass --protocol http"),
    ("https://github.com/a/b/tree/main", "a URL of a repo is https://host/owner/name[.git]"),
])
def test_common_mistakes_get_the_fix(text, said):
    with pytest.raises(SpecError) as e:
        RepoSpec.parse(text)
    assert str(e.value) == f"invalid repo spec {text!r}: {said}"


def test_a_commit_in_repo_info_says_to_pass_commit():
    with pytest.raises(SpecError) as e:
        parse_repo_info("owner/name@ffc13eb")
    assert str(e.value) == ("invalid repo spec 'owner/name@ffc13eb': a commit is not part "
                            "of repo_info: pass commit='ffc13eb' (hub.load('owner/name', "
                            "..., commit='ffc13eb'))")
