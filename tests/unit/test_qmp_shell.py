"""The QMP shell's QMP half speaks QEMU's own qmp-shell syntax (qemu.qmp's QMPShell parser)."""

from __future__ import annotations

import pytest
from aperture.qmp_client.shell import QmpSyntax, ShellError, parse_qmp


def test_plain_dotted_and_json_values() -> None:
    assert parse_qmp("query-status") == ("query-status", {})
    assert parse_qmp("device_del id=aperture0-win") == ("device_del", {"id": "aperture0-win"})
    cmd, args = parse_qmp("blockdev-add driver=null-co node-name=n0 size=4096 cache.direct=true")  # type: ignore[misc]
    assert cmd == "blockdev-add" and args == {"driver": "null-co", "node-name": "n0", "size": 4096,
                                              "cache": {"direct": True}}
    assert parse_qmp('{"execute": "query-pci"}') == ("query-pci", {})


def test_transactions_collect_actions_until_the_closing_paren() -> None:
    syntax = QmpSyntax()
    assert parse_qmp("transaction(", syntax) is None
    assert parse_qmp("block-dirty-bitmap-add node=n0 name=b0", syntax) is None
    cmd, args = parse_qmp(")", syntax)  # type: ignore[misc]
    assert cmd == "transaction"
    assert args["actions"] == [{"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "b0"}}]


@pytest.mark.parametrize("line", ['query-pci x="unterminated', '{"execute": 1}', "{not json"])
def test_malformed_input_is_one_line_error(line: str) -> None:
    with pytest.raises(ShellError):
        parse_qmp(line)
