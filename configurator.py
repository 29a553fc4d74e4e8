"""
Config overrides for the stage scripts, nanoGPT style:

    python pretrain.py config/moxin7b_phase1.py --batch_size=8 --compile=False

A stage script defines its settings as module globals, then calls
`configure(globals(), keys)`. Each positional argument is a config file that is
executed over those globals; each `--key=value` then overrides one of them. A
value is parsed as a Python literal (so `--lr=3e-4`, `--betas=(0.9,0.95)`,
`--flag=False`, and `dict(name='web', weight=1)` as config files write dicts) and kept as a
plain string when it is not one (`--out_dir=out/run1`).
`--key value` works too, and a bare `--flag` sets a boolean to True.

Mistakes end the run with one line saying what is wrong, before anything is
written: an unknown key names the closest known ones, a wrong type says what was
expected and what was given.
"""
import ast
import difflib
import sys


class ConfigError(ValueError):
    pass


def _closest(key, keys):
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return f" (did you mean {', '.join('--' + k for k in near)}?)" if near else ""


def _coerce(key, value, default):
    """Check `value` against the type of the default it replaces."""
    if default is None or value is None:
        return value  # None marks "unset / optional": any type may take its place
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--{key} expects True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --lr=1 is a fine float
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(
            f"--{key} expects {type(default).__name__} (default {default!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value


class _DictCalls(ast.NodeTransformer):
    """dict(name='web', weight=1) -> {'name': 'web', 'weight': 1}: config files write dicts that way."""

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args \
                and all(kw.arg for kw in node.keywords):
            return ast.Dict(keys=[ast.Constant(kw.arg) for kw in node.keywords],
                            values=[kw.value for kw in node.keywords])
        return node


def _parse_value(text):
    """A Python literal (dict(k=v) calls included), or the text itself when it is none."""
    try:
        return ast.literal_eval(_DictCalls().visit(ast.parse(text.strip(), mode="eval")))
    except (ValueError, SyntaxError, TypeError):
        return text  # a bare word or a path


def apply_overrides(g, keys, argv):
    """Apply config files and --key=value args to the dict `g`; raise ConfigError on mistakes."""
    keys = list(keys)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            _apply_file(g, keys, arg)
            continue
        key, sep, text = arg[2:].partition("=")  # partition: values may contain '='
        if key not in keys:
            raise ConfigError(f"unknown config key '--{key}'{_closest(key, keys)}")
        if not sep:
            if isinstance(g[key], bool):
                text = "True"  # a bare --flag switches it on
            elif argv and not argv[0].startswith("--"):
                text = argv.pop(0)  # --key value
            else:
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
        value = text if isinstance(g[key], str) else _parse_value(text)  # --out_dir=2024 stays a str
        g[key] = _coerce(key, value, g[key])


def _apply_file(g, keys, path):
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    scope = {}
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    for key, value in scope.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue  # the file's own helpers and imports
        if key not in keys:
            raise ConfigError(f"config file {path} sets unknown key '{key}'{_closest(key, keys)}")
        g[key] = _coerce(key, value, g[key])


def settings(g):
    """The names of a script's settings: its public module globals with plain values (numbers,
    strings, booleans, None, lists, tuples, dicts), which config files and --key=value may set."""
    return [k for k, v in g.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None), list, tuple, dict))]


def configure(g, keys, argv=None):
    """Like apply_overrides on sys.argv[1:], but a mistake prints one line and exits (code 2)."""
    try:
        apply_overrides(g, keys, sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
