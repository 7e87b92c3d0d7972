"""The documentation states facts the code must keep true."""

import re
from pathlib import Path

from ovsflow.ipfix.templates import RECORD_TEMPLATES

ROOT = Path(__file__).resolve().parent.parent


def test_ipfix_doc_lists_every_template_field_as_exported():
    text = (ROOT / "docs" / "ipfix.md").read_text()
    documented = {}
    for section in re.split(r"^## Template ", text, flags=re.M)[1:]:
        template_id = int(section.split(":", 1)[0])
        rows = re.findall(r"^\| (\w+) \| (\d+) \| .*\((\d+)\) \| \w+ \| (\d+) \|$", section, re.M)
        documented[template_id] = [(n, int(i), int(e), int(length)) for n, i, e, length in rows]
    exported = {
        rt.template.template_id: [(f.element.name, f.element.element_id, f.element.enterprise,
                                   f.length) for f in rt.template.fields]
        for rt in RECORD_TEMPLATES.values()}
    assert documented == exported


def test_readme_quick_start_has_exactly_two_commands():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick_start, re.S)
    assert len(blocks) == 1
    assert blocks[0].strip().splitlines() == ["scripts/demo", "scripts/test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci
