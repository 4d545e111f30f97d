"""Pipelines as data: spec strings, lists of passes, TOML recipes, and the errors for bad specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxopt import PIPELINES, Pass, PassResult, SpecError, parse_pipeline
from fxopt.passes.base import known_passes

BUILTIN = ["cleanup", "dce", "eliminate_noops", "remove_dropout", "remove_identity"]


def _names(passes) -> list[str]:
    return [p.name for p in passes]


def _specs(passes) -> list[str]:
    return [p.spec for p in passes]


@pytest.fixture
def args_pass(temp_pass):
    def t_args(
        gm,
        ctx,
        *,
        n: int = 0,
        x: float = 0.0,
        flag: bool = False,
        s: str = "",
        items: list | None = None,
    ) -> PassResult:
        """A test pass that takes one argument of each type."""
        return PassResult(gm, modified=False)

    return temp_pass("t_args", t_args)


def test_the_builtin_passes_are_registered() -> None:
    assert set(BUILTIN) <= set(known_passes())


def test_a_spec_string_is_a_list_of_passes() -> None:
    passes = parse_pipeline("cleanup,remove_dropout")
    assert _names(passes) == ["cleanup", "remove_dropout"]
    assert all(isinstance(p, Pass) and p.params == {} for p in passes)


@pytest.mark.parametrize(
    "spec", ["eliminate_noops(),dce", " eliminate_noops ( ) , dce ", "eliminate_noops,dce"]
)
def test_empty_parentheses_and_spaces_are_fine(spec) -> None:
    assert _names(parse_pipeline(spec)) == ["eliminate_noops", "dce"]


def test_arguments_are_parsed_as_int_float_bool_str_and_list(args_pass) -> None:
    (p,) = parse_pipeline(
        "t_args(n=3, x=0.5, flag=true, s='hello world', items=[1, -2.5e-3, word, 'a b', false, []])"
    )
    assert p.params == {
        "n": 3,
        "x": 0.5,
        "flag": True,
        "s": "hello world",
        "items": [1, -2.5e-3, "word", "a b", False, []],
    }
    assert type(p.params["n"]) is int
    assert type(p.params["x"]) is float
    assert p.params["flag"] is True
    (q,) = parse_pipeline("t_args(n=-7, x=2, flag=FALSE, s=plain, items=[])")
    assert q.params == {"n": -7, "x": 2, "flag": False, "s": "plain", "items": []}
    (r,) = parse_pipeline('t_args(s="double quoted", x=1e-3, n=+4)')
    assert r.params == {"s": "double quoted", "x": 1e-3, "n": 4}
    assert type(r.params["x"]) is float


@pytest.mark.parametrize(
    "params",
    [
        {"n": 3},
        {"x": 1e-05, "flag": True},
        {"s": "true"},
        {"s": "None"},
        {"s": "False"},
        {"s": "12"},
        {"s": "two words", "items": [1, "x y", 0.25, True]},
        {"s": "it's"},
        {"items": [[1, 2], [], ["a"]]},
    ],
)
def test_a_pass_spec_round_trips_through_the_parser(args_pass, params) -> None:
    original = Pass("t_args", **params)
    (again,) = parse_pipeline(original.spec)
    assert again.params == params, original.spec
    assert again.spec == original.spec


def test_pass_spec_and_repr() -> None:
    p = Pass("cleanup", max_rounds=3)
    assert p.spec == "cleanup(max_rounds=3)"
    assert repr(p) == "Pass(cleanup(max_rounds=3))"
    assert Pass("dce").spec == "dce"


def test_named_pipelines_expand() -> None:
    assert _names(parse_pipeline("default")) == PIPELINES["default"]
    assert _names(parse_pipeline(None)) == PIPELINES["default"]
    assert _names(parse_pipeline("default,dce")) == [*PIPELINES["default"], "dce"]
    for name in PIPELINES:
        assert parse_pipeline(name)


def test_a_list_mixes_pass_objects_strings_and_lists() -> None:
    first = Pass("cleanup", max_rounds=2)
    passes = parse_pipeline([first, "dce,remove_identity", ["remove_dropout"], Pass("dce")])
    assert _names(passes) == ["cleanup", "dce", "remove_identity", "remove_dropout", "dce"]
    assert passes[0] is first
    assert parse_pipeline(first) == [first]


def test_string_list_and_recipe_describe_the_same_pipeline(tmp_path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'pipeline = "cleanup(max_rounds=3)"\n\n[[passes]]\nname = "remove_dropout"\n\n'
        '[[passes]]\nname = "dce"\n'
    )
    from_string = parse_pipeline("cleanup(max_rounds=3),remove_dropout,dce")
    from_list = parse_pipeline([Pass("cleanup", max_rounds=3), Pass("remove_dropout"), "dce"])
    want = _specs(from_string)
    assert want == ["cleanup(max_rounds=3)", "remove_dropout", "dce"]
    assert _specs(from_list) == want
    assert _specs(parse_pipeline(recipe)) == want
    assert _specs(parse_pipeline(str(recipe))) == want


def test_recipe_passes_tables_carry_typed_arguments(tmp_path, args_pass) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[passes]]\nname = "t_args"\nn = 2\nx = 0.5\nflag = true\ns = "a b"\nitems = [1, 2]\n'
    )
    (p,) = parse_pipeline(Path(recipe))
    assert p.params == {"n": 2, "x": 0.5, "flag": True, "s": "a b", "items": [1, 2]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipeline = 'cleanup'\nspeed = 'fast'\n", "unknown key(s) speed"),
        ("[[passes]]\nmax_rounds = 2\n", "has no name"),
        ("[[passes]]\nname = 'cleanup'\nbogus = 1\n", "bogus"),
        ("[verify]\nrtol = 0.1\n", "names no passes"),
        ("pipeline = 'cleanup,,dce'\n", "position 8"),
        ("pipeline = \n", "not valid TOML"),
    ],
)
def test_bad_recipes_are_spec_errors(tmp_path, text, message) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(SpecError) as info:
        parse_pipeline(recipe)
    assert message in str(info.value)


def test_a_missing_recipe_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(SpecError, match="nowhere.toml"):
        parse_pipeline(missing)
    assert not missing.exists()


@pytest.mark.parametrize(
    ("spec", "pos", "what"),
    [
        ("cleanup,,dce", 8, "expected a pass name, found ','"),
        ("cleanup(max_rounds=)", 19, "expected a value, found ')'"),
        ("nope", 0, "unknown pass 'nope'"),
        ("cleanup,nope(x=1)", 8, "unknown pass 'nope'"),
        ("cleanup(bogus=1)", 0, "unknown argument(s) bogus; it accepts: max_rounds"),
        ("dce(max_rounds=1)", 0, "it accepts: none"),
        ("cleanup(max_rounds=2", 20, "unexpected end of spec"),
        ("cleanup)", 7, "expected ',' between passes, found ')'"),
        ("cleanup((", 8, "expected an argument name, found '('"),
        ("cleanup(max_rounds=2))", 21, "expected ',' between passes"),
        ("cleanup,", 8, "unexpected end of spec"),
        ("cleanup dce", 8, "expected ',' between passes, found 'dce'"),
        ("cleanup(max_rounds=2,max_rounds=3)", 21, "given twice"),
        ("cleanup(max_rounds=[1,2)", 23, "expected ',' or ']'"),
        ("cleanup(max_rounds 2)", 19, "expected '='"),
        ("cle@nup", 3, "unexpected character"),
        ("", 0, "empty pipeline"),
        ("   ", 0, "empty pipeline"),
    ],
)
def test_malformed_specs_point_at_the_spot_and_list_the_passes(spec, pos, what) -> None:
    with pytest.raises(SpecError) as info:
        parse_pipeline(spec)
    message = str(info.value)
    assert f"position {pos}:" in message
    assert what in message
    lines = message.splitlines()
    i = lines.index(f"  {spec}")
    assert lines[i + 1] == "  " + " " * pos + "^"
    assert "known passes:" in message
    for name in BUILTIN:
        assert name in message
    assert "default" in message  # the named pipelines too


def test_unknown_pass_objects_suggest_a_close_name() -> None:
    with pytest.raises(SpecError) as info:
        Pass("remove_dropot")
    assert "did you mean remove_dropout" in str(info.value)
    with pytest.raises(SpecError, match="accepts: max_rounds"):
        Pass("cleanup", rounds=2)
