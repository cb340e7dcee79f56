"""The BPF sources obey the design: no kprobes; one program text per family set."""

import re

import pytest

from agent.ebpf import loader


def test_no_kprobes_anywhere() -> None:
    offenders = []
    for path in list(loader.BPF_DIR.rglob("*.[ch]")) + list(loader.BPF_DIR.parent.joinpath("agent").rglob("*.py")):
        text = path.read_text()
        if path.name == "loader.py":
            text = text.replace('r"\\bk(ret)?probe__|attach_kprobe"', "")  # the guard itself
        if re.search(r"\bk(ret)?probe__\w|attach_k(ret)?probe\(|BPF_KPROBE", text):
            offenders.append(str(path))
    assert offenders == []


def test_loader_refuses_a_kprobe(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "proc.c").write_text("int kprobe__tcp_connect(void *ctx) { return 0; }\n")
    with pytest.raises(loader.LoadError, match="uses a kprobe"):
        loader.program_text(["proc"], tmp_path)


def test_every_family_file_exists_and_is_inlined_with_line_markers() -> None:
    text = loader.program_text(loader.FAMILIES)
    for fam in loader.FAMILIES.values():
        assert f'#line 1 "{loader.BPF_DIR / fam.source}"' in text
        for more in fam.more_sources:  # right after its family's file (it uses that file's functions)
            assert text.index(f'#line 1 "{loader.BPF_DIR / more}"') > text.index(f'#line 1 "{loader.BPF_DIR / fam.source}"')


def test_ring_buffer_needs_5_8() -> None:
    assert loader.ringbuf_supported("5.8.0")
    assert loader.ringbuf_supported("6.18.44-fc")
    assert not loader.ringbuf_supported("5.4.0-150-generic")
