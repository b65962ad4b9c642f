""".env.example: generated from the settings' declarations, and kept equal to them."""

from pathlib import Path

from claude_code_api.config.env_example import IN_THE_CONTAINER, render
from claude_code_api.config.settings import declarations

ENV_EXAMPLE = Path(__file__).parents[2] / ".env.example"


def test_env_example_is_generated_from_the_declarations():
    assert ENV_EXAMPLE.read_text() == render(), (
        ".env.example is stale: run `python -m claude_code_api.config.env_example .env.example`"
    )


def test_every_setting_is_listed_commented_out_with_its_default():
    lines = render().splitlines()
    for _attribute, declared in declarations():
        assert f"# {declared.name}={declared.default}" in lines
    # A copy as .env changes nothing until a line is uncommented.
    assert all(not line or line.startswith("#") for line in lines)


def test_container_notes_name_declared_settings():
    declared = {declared.name for _attribute, declared in declarations()}
    assert set(IN_THE_CONTAINER) <= declared


def test_the_generator_takes_one_path_and_never_writes_a_file_named_after_a_flag(
    tmp_path, monkeypatch, capsys
):
    from claude_code_api.config.env_example import main

    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0 and "usage:" in capsys.readouterr().out
    assert main([]) == 2 and main(["-x"]) == 2 and main(["a", "b"]) == 2
    assert "usage:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # (an earlier version wrote ./--help)
    assert main(["out.env"]) == 0
    assert (tmp_path / "out.env").read_text() == render()
