"""Kernel headers resolution order and the merged tree for Debian's split packages."""

import os
from pathlib import Path

from agent.ebpf import headers


def fake_debian_headers(usr_src: Path, version: str) -> None:
    common = usr_src / f"linux-headers-{version}-common"
    arch = usr_src / f"linux-headers-{version}-amd64"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("/* common */")
    (common / "arch" / "x86" / "include" / "asm").mkdir(parents=True)
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "config").mkdir(parents=True)
    (arch / "arch" / "x86" / "include" / "generated").mkdir(parents=True)
    (arch / ".config").write_text("CONFIG_X=y\n")


def test_running_kernels_build_dir_wins(tmp_path: Path) -> None:
    build = tmp_path / "modules" / "6.18.0" / "build" / "include"
    build.mkdir(parents=True)
    fake_debian_headers(tmp_path / "src", "6.1.0-56")
    src = headers.resolve("6.18.0", str(tmp_path / "modules"), str(tmp_path / "nokheaders"),
                          str(tmp_path / "src"), str(tmp_path / "run"))
    assert src.kind == "modules" and src.env == ()


def test_kheaders_before_installed_packages(tmp_path: Path) -> None:
    (tmp_path / "kheaders.tar.xz").write_bytes(b"")
    fake_debian_headers(tmp_path / "src", "6.1.0-56")
    src = headers.resolve("6.18.0", str(tmp_path / "modules"), str(tmp_path / "kheaders.tar.xz"),
                          str(tmp_path / "src"), str(tmp_path / "run"))
    assert src.kind == "kheaders"


def test_closest_installed_headers_are_merged_into_one_tree(tmp_path: Path) -> None:
    for v in ("5.10.0-30", "6.1.0-56", "6.12.0-1"):
        fake_debian_headers(tmp_path / "src", v)
    src = headers.resolve("6.11.3-custom", str(tmp_path / "modules"), str(tmp_path / "none"),
                          str(tmp_path / "src"), str(tmp_path / "run"))
    assert src.kind == "closest"
    assert src.path.endswith("linux-headers-6.12.0-1-amd64")
    assert dict(src.env) == {"BCC_KERNEL_SOURCE": src.path}
    tree = Path(src.path)
    # common and arch parts side by side, in every directory both have
    assert (tree / "include" / "linux" / "kconfig.h").read_text() == "/* common */"
    assert (tree / "include" / "generated").is_dir()
    assert (tree / "arch" / "x86" / "include" / "asm").is_dir()
    assert (tree / "arch" / "x86" / "include" / "generated").is_dir()
    assert os.path.islink(tree / ".config")
    # and nothing under /lib/modules was touched
    assert not (tmp_path / "modules").exists()


def test_resolving_twice_reuses_the_tree(tmp_path: Path) -> None:
    fake_debian_headers(tmp_path / "src", "6.1.0-56")
    args = ("6.18.0", str(tmp_path / "m"), str(tmp_path / "k"), str(tmp_path / "src"), str(tmp_path / "run"))
    assert headers.resolve(*args).path == headers.resolve(*args).path


def test_no_headers_says_how_to_install_them(tmp_path: Path) -> None:
    src = headers.resolve("6.18.0", str(tmp_path / "m"), str(tmp_path / "k"), str(tmp_path / "src"), str(tmp_path / "run"))
    assert not src.found
    assert "apt-get install linux-headers-" in src.detail


def test_backports_headers_names_are_found_and_common_parts_are_never_candidates(tmp_path: Path) -> None:
    fake_debian_headers(tmp_path / "src", "6.1.0-56")
    fake_debian_headers(tmp_path / "src", "6.12.95+deb12")
    src = headers.resolve("6.12.95+deb12-amd64", str(tmp_path / "modules"), str(tmp_path / "none"),
                          str(tmp_path / "src"), str(tmp_path / "run"))
    assert src.path.endswith("linux-headers-6.12.95+deb12-amd64")
    names = [c[0] for c in headers._usr_src_candidates(str(tmp_path / "src"))]
    assert names == ["linux-headers-6.1.0-56-amd64", "linux-headers-6.12.95+deb12-amd64"]
