"""The ``--config`` files of a command line, checked before jsonargparse reads them.

jsonargparse reports a YAML syntax error without the file or line ("Problems parsing config: mapping values are
not allowed here"), and an unknown key without the file that holds it; with several ``--config`` files a user has
to guess. It also reads whatever the path names: a FIFO blocks forever, and a few lines of nested YAML aliases (a
"billion laughs" file) expand into gigabytes once the config is copied. :func:`check_config_files` refuses all of
these in one line; :func:`where_set` finds the file and line that set a key named in a later error.
"""

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from lightscale.core.errors import UserError

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a few KB; anything larger is a mistake or an attack
MAX_CONFIG_VALUES = 100_000
SUBCOMMAND_KEYS = (
    ("fit",),
    ("validate",),
    ("test",),
    ("predict",),
)  # values after alias expansion; real configs have hundreds


def config_paths(argv: Sequence[str]) -> list[str]:
    """The values of every ``--config`` option, in order (``--config X`` and ``--config=X``)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _expanded_size(node: yaml.Node, memo: dict[int, int], depth: int = 0) -> int:
    """Values the node stands for once every alias is copied out (aliases share the node object)."""
    if id(node) in memo:
        return memo[id(node)]
    if depth > 200:
        raise UserError("nested more than 200 levels deep")
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo, depth + 1) for item in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def _compose(path: str) -> yaml.Node | None:
    """Parse ``path`` into YAML nodes (with line numbers), or raise a one-line :class:`UserError`."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UserError(f"--config {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"--config {path}: not a regular file (a directory, pipe or device cannot be a config)")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise UserError(f"--config {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KB of YAML")
    try:
        with open(path, encoding="utf-8") as file:
            return yaml.compose(file, Loader=yaml.SafeLoader)
    except UnicodeDecodeError as error:
        raise UserError(f"--config {path}: not UTF-8 text (byte {error.start})") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = error.problem or error.context or "invalid YAML"
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: YAML syntax error: {str(error).splitlines()[0]}") from None


def check_config_files(argv: Sequence[str]) -> None:
    """Refuse, in one line naming the file, a ``--config`` that is not a readable regular file, is not valid YAML
    (with its line and column), or expands into more than :data:`MAX_CONFIG_VALUES` values through aliases."""
    for path in config_paths(argv):
        node = _compose(path)
        if node is None:
            continue
        try:
            size = _expanded_size(node, {})
        except UserError as error:
            raise UserError(f"--config {path}: {error}") from None
        if size > MAX_CONFIG_VALUES:
            raise UserError(
                f"--config {path}: its YAML aliases (&anchor / *alias) expand into more than {MAX_CONFIG_VALUES:,} "
                "values; refusing to read it"
            )


def _keys(node: yaml.Node, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], int]]:
    """``(key path, line)`` of every mapping key under ``node``; ``init_args`` / ``dict_kwargs`` levels are
    skipped so paths read like jsonargparse's error messages (``model.lr``)."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        name = str(key.value).rstrip("+")
        path = prefix if name in ("init_args", "dict_kwargs") else (*prefix, name)
        yield path, key.start_mark.line + 1
        if isinstance(value, yaml.MappingNode):
            yield from _keys(value, path)
        elif isinstance(value, yaml.SequenceNode):
            for item in value.value:
                yield from _keys(item, path)


def where_set(key: str, argv: Sequence[str]) -> str | None:
    """``file:line`` of the last ``--config`` file that sets ``key`` (dotted, as in error messages), if any."""
    wanted = tuple(part for part in key.split(".") if part not in ("init_args", "dict_kwargs"))
    found = None
    for path in config_paths(argv):
        try:
            node = _compose(path)
        except UserError:
            continue
        for keys, line in _keys(node) if node is not None else ():
            if keys == wanted or (
                len(keys) > 1 and keys[0] in ("fit", "validate", "test", "predict") and keys[1:] == wanted
            ):
                found = f"{Path(path)}:{line}"
    return found


def given_on_command_line(key: str, argv: Sequence[str]) -> bool:
    """Whether ``key`` (dotted, as in error messages) was set by a command-line option rather than a file."""
    wanted = tuple(part for part in key.split(".") if part not in ("init_args", "dict_kwargs"))
    for arg in argv:
        if arg.startswith("--") and arg != "--config":
            name = arg[2:].split("=", 1)[0].rstrip("+")
            if tuple(part for part in name.split(".") if part not in ("init_args", "dict_kwargs")) == wanted:
                return True
    return False
