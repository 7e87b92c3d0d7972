"""The configuration file: YAML read strictly, then parsed; the only exception is ConfigError."""

from __future__ import annotations

from collections.abc import Hashable

import yaml

from ..protocol_list import quote_value
from .model import Config, ConfigError
from .parse import parse_config


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last), a
    key that is a list or a map (`? [a, b]`), and a scalar that PyYAML's constructors cannot
    turn into a value (an integer of more than 4300 digits, a 13th month), each as a YAML
    error with its line."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, which may override
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {type(key).__name__} as a key; keys are names",
                    key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {quote_value(key)} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):  # type: ignore[override]
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {quote_value(node.value)}: {err}",
                node.start_mark) from None


def load_config(path: str) -> Config:
    """Read and validate the file. Whatever is in it, the only exception is ConfigError, with
    one line per problem: a reload relies on that to keep the running configuration."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as err:
        raise ConfigError([f"{path}: cannot read the configuration: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: not UTF-8 text: {err.reason}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {_one_line(err)}"]) from None
    except RecursionError:  # the pure-Python parser, without libyaml's depth limit
        raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    return parse_config(data)


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message spread over one line, each mark as `line L, column C`."""
    return " ".join(str(err).split())
